#!/usr/bin/env bash
# The Triton kernels' tests under other triton releases than the one torch brings (3.8 with torch 2.14.1): by
# default 3.9.0, the newest (3.6.0, the GPU machine's, comes with torch 2.11 in scripts/test_device_stack.sh).
# Each release is installed (once) into its own folder inside the project's venv and put first on PYTHONPATH;
# the tests run in the interpreter (TRITON_INTERPRET=1) and compile every kernel variant for sm_90 with that
# release's compiler and ptxas (no GPU needed).
#   bash scripts/test_triton_versions.sh [VERSION ...]      (default: 3.9.0; extra pytest args: PYTEST_ARGS)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$repo/scripts/setup_env.sh")"
cd "$repo"
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.9.0)
export TRITON_INTERPRET=1
for version in "${versions[@]}"; do
  site="$(dirname "$(dirname "$py")")/triton-versions/$version"
  if [ ! -f "$site/.installed" ]; then
    rm -rf "$site"
    "$py" -m pip install -q --no-deps --target "$site" "triton==$version" >&2
    touch "$site/.installed"
  fi
  got="$(PYTHONPATH="$site" "$py" -c 'import triton; print(triton.__version__)')"
  [ "$got" = "$version" ] || { echo "test_triton_versions: asked for triton $version, imported $got" >&2; exit 1; }
  echo "== Triton kernel tests with triton $version"
  # shellcheck disable=SC2086
  PYTHONPATH="$site" "$py" -m pytest -q -p no:cacheprovider tests/kernels tests/tokenizer/test_fast_geometry.py \
    ${PYTEST_ARGS:-}
done
