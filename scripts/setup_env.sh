#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install dartmamba with the extras the demo and the tests
# need. Usage: source-free, `bash scripts/setup_env.sh [venv-dir]`; prints the venv's python path last.
# DARTMAMBA_VENV overrides the location (default: .venv in the repository). DARTMAMBA_PINS overrides the pinned
# packages (default: torch==2.14.1 torchvision==0.29.1 timm==1.0.31; scripts/test_device_stack.sh pins the GPU
# machine's).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-${DARTMAMBA_VENV:-$repo/.venv}}"
python_bin="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$python_bin" -m venv "$venv" >&2
fi
py="$venv/bin/python"
stamp="$venv/.dartmamba-installed"
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ] || [ "$repo/setup.py" -nt "$stamp" ]; then
  "$py" -m pip install -q --upgrade pip >&2
  # torch 2.14.1 + torchvision 0.29.1 is a pair that imports together (timm needs torchvision); on the project's
  # CPU machines both lie on local disk. DeepSpeed's ops are JIT-built when used, so nothing is compiled here.
  # timm is pinned too: scripts/test_timm_suite.sh runs that release's own model tests against ours.
  read -r -a pins <<< "${DARTMAMBA_PINS:-torch==2.14.1 torchvision==0.29.1 timm==1.0.31}"
  "$py" -m pip install -q "${pins[@]}" >&2
  DS_BUILD_OPS=0 "$py" -m pip install -q -e "$repo[test,train]" "${pins[@]}" >&2
  touch "$stamp"
fi
echo "$py"
