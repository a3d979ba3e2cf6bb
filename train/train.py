"""Entry point: ``deepspeed train/train.py --config configs/<recipe>.yaml [key=value ...]``, or the same with plain
``python`` for one process (see :mod:`dartmamba_train.cli`)."""
from __future__ import annotations

import os
import sys


def _bootstrap() -> None:
    """Run as a script, this folder is ``sys.path[0]``: take it off (its module names must not shadow others) and
    make ``dartmamba_train`` importable even without an install of the repository."""
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or os.getcwd()) == here:
        sys.path.pop(0)
    try:
        import dartmamba_train  # noqa: F401
        return
    except ImportError:
        pass
    import importlib.util

    repo = os.path.dirname(here)
    if repo not in sys.path:
        sys.path.insert(0, repo)
    spec = importlib.util.spec_from_file_location("dartmamba_train", os.path.join(here, "__init__.py"),
                                                  submodule_search_locations=[here])
    module = importlib.util.module_from_spec(spec)
    sys.modules["dartmamba_train"] = module
    spec.loader.exec_module(module)


if __name__ == "__main__":
    _bootstrap()
    from dartmamba_train.cli import main

    sys.exit(main())
