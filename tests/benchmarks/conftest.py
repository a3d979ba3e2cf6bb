"""The benchmark scripts live in the repository's ``benchmarks/`` folder (not an installed package)."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# tiny models that build and run in well under a second on one CPU core
TINY_VIM = {"embed_dim": 32, "depth": 1, "num_classes": 5}
TINY_FIXED = {"patch_size": 8}
TINY_DART = {"img_size": 64, "patch_size": 8, "grid_size": 4, "dart_cfg": {"trunk": "tiny_cnn"}}
