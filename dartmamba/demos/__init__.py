"""Runnable demos: ``python -m dartmamba.demos.<name> --help``."""
