#!/usr/bin/env bash
# The whole test suite on CPU with the GPU machine's library versions (torch 2.11.0, torchvision 0.26.0, triton
# 3.6.0, timm 1.0.29; see ../shared/notes/platform.md), in its own venv (.venv-device-stack, or the first argument):
# catches what a torch / triton / timm version difference breaks before device time is spent on it.
#   bash scripts/test_device_stack.sh [venv-dir] [pytest args ...]      (default: all of tests/)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo/.venv-device-stack}"
[ $# -gt 0 ] && shift
py="$(DARTMAMBA_PINS="torch==2.11.0 torchvision==0.26.0 timm==1.0.29" bash "$repo/scripts/setup_env.sh" "$venv")"
"$py" - <<'PY'
import timm, torch, triton
got = (torch.__version__.split("+")[0], triton.__version__, timm.__version__)
assert got == ("2.11.0", "3.6.0", "1.0.29"), f"device stack: expected torch 2.11.0, triton 3.6.0, timm 1.0.29; got {got}"
print(f"device stack: torch {torch.__version__}, triton {triton.__version__}, timm {timm.__version__}")
PY
cd "$repo"
export TRITON_INTERPRET=1
[ $# -gt 0 ] || set -- tests
exec "$py" -m pytest -q -ra -p no:cacheprovider "$@"
