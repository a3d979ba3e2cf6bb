"""Console script ``dartmamba-train``: the same command line as ``train/train.py`` (see ``dartmamba_train.cli``).

The training code ships as the ``dartmamba_train`` package (the repository's ``train/`` folder); it needs the
``train`` extra (``pip install 'dartmamba[train]'``: deepspeed).
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from dartmamba_train.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
