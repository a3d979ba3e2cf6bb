#!/usr/bin/env bash
# timm's own model test suite against every model dartmamba registers (issue: "native in timm").
#   bash scripts/test_timm_suite.sh [pytest args ...]
# Takes tests/test_models.py from the sdist of the timm version installed in the project's venv (downloaded from
# PyPI into a temporary folder; nothing of timm's is committed), and runs
#   1. timm's file, with the dartmamba_timm_plugin (tests/timm_suite/): it imports dartmamba, registers the test-size
#      DART models test_vim_dart / test_deit_dart, keeps only the tests of our models, and marks the exclusions it
#      lists with their reasons;
#   2. tests/timm_suite/test_timm_functions.py: timm's config / intermediates / pruning test functions on the models
#      timm's own name- and module-based lists leave out.
# Each prints a table of test function x model x outcome; a failure fails the script. TIMEOUT (timm's knob for its
# per-test limits) defaults to 900 s here: the limits are sized for GPU-less CI runners with many cores.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$repo/scripts/setup_env.sh")"
version="$("$py" -c 'import timm; print(timm.__version__)')"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$py" -m pip download -q --no-deps --no-binary :all: "timm==$version" -d "$work" >&2
tar -xzf "$work/timm-$version.tar.gz" -C "$work"
suite="$work/timm-$version/tests"
[ -f "$suite/test_models.py" ] || { echo "test_timm_suite: no tests/test_models.py in timm $version's sdist" >&2; exit 1; }
export PYTHONPATH="$repo/tests/timm_suite${PYTHONPATH:+:$PYTHONPATH}"
export DARTMAMBA_TIMM_TESTS="$suite" DARTMAMBA_TRUNK_WEIGHTS=random TRITON_INTERPRET=1 TIMEOUT="${TIMEOUT:-900}"
echo "== timm $version tests/test_models.py on dartmamba's models"
(cd "$work/timm-$version" && "$py" -m pytest -q -ra -p no:cacheprovider -p dartmamba_timm_plugin \
  tests/test_models.py "$@")
echo "== timm $version test functions on the models timm's lists leave out (tests/timm_suite/test_timm_functions.py)"
(cd "$repo" && "$py" -m pytest -q -ra -p no:cacheprovider -p dartmamba_timm_plugin \
  tests/timm_suite/test_timm_functions.py "$@")
