#!/usr/bin/env bash
# The whole test suite on CPU with the GPU machine's library versions (torch 2.11.0, torchvision 0.26.0, triton
# 3.6.0, timm 1.0.29; see ../shared/notes/platform.md), in its own venv (.venv-device-stack, or the first argument):
# catches what a torch / triton / timm version difference breaks before device time is spent on it.
#   bash scripts/test_device_stack.sh [venv-dir] [pytest args ...]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo/.venv-device-stack}"
[ $# -gt 0 ] && shift
python_bin="${PYTHON:-python3}"
pins=("torch==2.11.0" "torchvision==0.26.0" "timm==1.0.29")
if [ ! -x "$venv/bin/python" ]; then
  "$python_bin" -m venv "$venv" >&2
fi
py="$venv/bin/python"
stamp="$venv/.dartmamba-installed"
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
  "$py" -m pip install -q --upgrade pip >&2
  "$py" -m pip install -q "${pins[@]}" >&2
  DS_BUILD_OPS=0 "$py" -m pip install -q -e "$repo[test,train]" "${pins[@]}" >&2
  touch "$stamp"
fi
"$py" - <<'PY'
import timm, torch, triton
got = (torch.__version__.split("+")[0], triton.__version__, timm.__version__)
assert got == ("2.11.0", "3.6.0", "1.0.29"), f"device stack: expected torch 2.11.0, triton 3.6.0, timm 1.0.29; got {got}"
print(f"device stack: torch {torch.__version__}, triton {triton.__version__}, timm {timm.__version__}")
PY
cd "$repo"
export TRITON_INTERPRET=1
exec "$py" -m pytest -q -ra -p no:cacheprovider tests "$@"
