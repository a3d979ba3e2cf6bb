"""Entry point: ``deepspeed train/train.py --config <recipe name or YAML> [key=value ...]``, the same with plain
``python`` for one process, or ``python -m dartmamba_train.train`` from any installation (see
:mod:`dartmamba_train.cli`)."""
from __future__ import annotations

import os
import sys


def _bootstrap() -> None:
    """Run as a script, this folder is ``sys.path[0]``: take it off (its module names must not shadow others). The
    code runs from the installed ``dartmamba_train`` package (an editable install of a checkout included)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or os.getcwd()) == here:
        sys.path.pop(0)
    try:
        import dartmamba_train  # noqa: F401
    except ImportError as err:
        sys.exit(f"train.py: dartmamba is not installed ({err}); install it with 'pip install -e .[train]' in the "
                 f"checkout, or a wheel")


if __name__ == "__main__":
    _bootstrap()
    from dartmamba_train.cli import main

    sys.exit(main())
