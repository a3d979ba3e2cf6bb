"""timm's own model test suite run against dartmamba's models (see plugin.py; scripts/test_timm_suite.sh)."""
