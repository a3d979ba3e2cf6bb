#!/usr/bin/env bash
# The GPU check, in one command, for a fresh lent GPU machine (H100 / H200; Python 3.12, torch+CUDA, no network):
#
#   bash benchmarks/gpu_check.sh [--quick] [--budget SECONDS] [--steps tests,table,resample,tokenizer,triton,scaling]
#                                [--out DIR] [--skip-install]
#   bash benchmarks/gpu_check.sh --dry-run        # list what would run (works on any machine, no GPU needed)
#
# 1. install: wheels from .devcarry/ (mamba-ssm built for that machine, ...) into /tmp/site, then the project
#    (pip install -e ., no deps, no network); falls back to PYTHONPATH when an editable install is impossible
# 2. GPU tests: every test file with a `gpu` mark (TRITON_INTERPRET=0; collection errors of CPU-only test modules,
#    e.g. ones importing hypothesis, do not stop the run)
# 3. benchmarks: the Vim/DeiT throughput table (benchmarks.model_table), bench_resample.py, bench_tokenizer.py when
#    present, bench_triton_ops.py (dartmamba's Triton scan / conv vs mamba-ssm / causal-conv1d at Vim-S shapes, and
#    the Vim-S training step each way), and the scaling sweep (inference img/s vs tokens, resumable; benchmarks.scaling)
# 4. results (json/csv/markdown, logs) under benchmarks/results/<card-name-slug>/ (and copied to $OUT/ when the
#    environment sets OUT), and all tables printed LAST (summary.md).
#
# Every step runs under `timeout` with a share of --budget (default 540 s; --quick 300 s: tests 25%, table 30%,
# resample 7%, tokenizer 18%, triton 8%), so the whole check fits a 10-minute device command; the sweep gets what is
# left and stops cleanly (rerun, e.g. with --steps scaling, to resume it from the CSV).
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

quick=0 dry=0 skip_install=0 budget="" out="" steps="tests,table,resample,tokenizer,triton,scaling"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --dry-run) dry=1 ;;
    --skip-install) skip_install=1 ;;
    --skip-tests) steps="${steps/tests,/}" ;;
    --steps) steps="$2"; shift ;;
    --budget) budget="$2"; shift ;;
    --out) out="$2"; shift ;;
    -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$budget" ]; then
  if [ "$quick" = 1 ]; then budget=300; else budget=540; fi
fi
for s in ${steps//,/ }; do
  case "$s" in
    tests|table|resample|tokenizer|triton|scaling) ;;
    *) echo "gpu_check: unknown step $s" >&2; exit 2 ;;
  esac
done
want() { [[ ",$steps," == *",$1,"* ]]; }
py="${PYTHON:-python3}"
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

# per-step time limits (seconds): shares of the budget; the scaling sweep gets what is left
t_install=60
t_tests=$(( budget * 25 / 100 )) t_table=$(( budget * 30 / 100 ))
t_resample=$(( budget * 7 / 100 )) t_tokenizer=$(( budget * 18 / 100 )) t_triton=$(( budget * 8 / 100 ))
if [ "$quick" = 1 ]; then
  table_args=(--quick)
  resample_args=(--tokens 196 --dtypes bf16 --repeats 5)
  triton_args=(--repeats 10)
  sweep_args=(--sizes s --tokens 196 784 1568 --batch-size 128 --repeats 3 --iters 3 --warmup 2)
else
  table_args=(--compile)
  resample_args=(--dtypes bf16 --repeats 10)
  triton_args=(--repeats 20)
  sweep_args=(--sizes s ti b --tokens 196 392 784 1568 --batch-size 128 --repeats 3 --iters 5 --warmup 2)
fi
# DARTMAMBA_GPU_CHECK_CPU_SMOKE=1: run the whole flow on a CPU with tiny settings (checks this script, not the GPU)
cpu_smoke="${DARTMAMBA_GPU_CHECK_CPU_SMOKE:-0}"
if [ "$cpu_smoke" = 1 ]; then
  table_args=(--device cpu --tiny --batch-size 2 --amp none --modes infer --warmup 1 --repeats 1 --iters 1)
  resample_args=(--smoke)
  triton_args=(--smoke)
  sweep_args=(--device cpu --amp none --families vim --sizes ti --tokens 16 36 --batch-size 2 --repeats 1 --iters 1
              --warmup 1 --model-kwargs '{"depth": 1, "embed_dim": 32}' --fixed-kwargs '{"patch_size": 8}'
              --dart-kwargs '{"img_size": 64, "patch_size": 8, "grid_size": 4, "dart_cfg": {"trunk": "tiny_cnn"}}')
fi

gpu_test_files() {
  grep -rlE "pytest\.mark\.gpu|mark\.gpu" tests --include='test_*.py' | sort
}

# ---------------------------------------------------------------------------------------------------------------
if [ "$dry" = 1 ]; then
  res="${out:-benchmarks/results/<card-name-slug>}"
  echo "gpu_check dry run: budget ${budget} s ($([ "$quick" = 1 ] && echo quick || echo full)); results in $res/"
  n=0
  step() { n=$((n + 1)); echo "[$n] $1 (limit $2 s): ${*:3}"; }
  if [ "$skip_install" = 0 ]; then
    if compgen -G ".devcarry/*.whl" > /dev/null; then
      step install "$t_install" "$py -m pip install -q --no-index --no-deps --target /tmp/site .devcarry/*.whl" \
        "&& export PYTHONPATH=/tmp/site:\$PYTHONPATH && $py -m pip install -q --no-index --no-deps" \
        "--no-build-isolation -e ."
    else
      step install "$t_install" "(no .devcarry/*.whl here: mamba-ssm must already be installed)" \
        "$py -m pip install -q --no-index --no-deps --no-build-isolation -e ."
    fi
  fi
  want tests && step gpu-tests "$t_tests" "TRITON_INTERPRET=0 DARTMAMBA_GPU_TABLE=0 $py -m pytest -q -m gpu" \
    "-rs --continue-on-collection-errors" $(gpu_test_files | tr '\n' ' ')
  want table && step model-table "$t_table" \
    "$py -m benchmarks.model_table --out $res ${table_args[*]} --time-budget $((t_table - 40))"
  want resample && step resample "$t_resample" \
    "$py benchmarks/bench_resample.py --json $res/resample.json ${resample_args[*]}"
  if want tokenizer; then
    if [ -f benchmarks/bench_tokenizer.py ]; then
      step tokenizer "$t_tokenizer" "$py benchmarks/bench_tokenizer.py [--json ... --markdown $res/tokenizer.md]" \
        "[--budget-s $(( t_tokenizer - 25 ))] [--no-compile with --quick] (the options it has)"
    else
      echo "    (benchmarks/bench_tokenizer.py not present: skipped)"
    fi
  fi
  want triton && step triton "$t_triton" \
    "$py benchmarks/bench_triton_ops.py --json $res/triton.json --markdown $res/triton.md ${triton_args[*]}"
  want scaling && step scaling "rest of budget" \
    "(seeded with benchmarks/results/flops/scaling/scaling.csv) $py -m benchmarks.scaling --metrics flops infer" \
    "--amp bf16 --out $res/scaling ${sweep_args[*]} --time-budget <rest - 45>"
  step summary 0 "cat $res/summary.md (env, tests, model table, resample, tokenizer, triton, scaling summary)"
  for f in benchmarks/model_table.py benchmarks/bench_resample.py benchmarks/scaling.py benchmarks/throughput.py \
           benchmarks/bench_triton_ops.py; do
    [ -f "$f" ] || { echo "missing $f" >&2; exit 1; }
  done
  exit 0
fi

# ---------------------------------------------------------------------------------------------------------------
# 1. install
export TRITON_INTERPRET=0
# The device has no network: the DART models' frozen scorer trunks start random (speed and kernel checks only).
export DARTMAMBA_TRUNK_WEIGHTS="${DARTMAMBA_TRUNK_WEIGHTS:-random}"
install_log="$(mktemp)"
if [ "$skip_install" = 0 ]; then
  echo "== install ($(elapsed) s)"
  if compgen -G ".devcarry/*.whl" > /dev/null; then
    timeout "$t_install" "$py" -m pip install -q --no-index --no-deps --target /tmp/site .devcarry/*.whl \
      >> "$install_log" 2>&1 || echo "gpu_check: installing .devcarry wheels failed (see below)" >&2
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if ! timeout "$t_install" "$py" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
      >> "$install_log" 2>&1; then
    echo "gpu_check: editable install failed; using PYTHONPATH=$repo instead" >&2
    mkdir -p /tmp/site && ln -sfn "$repo/kernels" /tmp/site/dartmamba_kernels
    export PYTHONPATH="$repo:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  tail -5 "$install_log"
fi
if [ "$cpu_smoke" = 1 ]; then
  export TRITON_INTERPRET=1
  card="cpu-smoke"
elif ! "$py" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to torch; this script is for the GPU machine (try --dry-run)" >&2
  exit 2
else
  card="$("$py" -c "import torch; print(torch.cuda.get_device_name(0))")"
fi
card_slug="$(echo "$card" | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')"
res="${out:-benchmarks/results/$card_slug}"
logs="$res/logs"
mkdir -p "$logs"
cp "$install_log" "$logs/install.log"
echo "gpu_check on $card: results in $res/ (budget ${budget} s)"
"$py" - "$res/env.json" <<'EOF'
import json, subprocess, sys
import torch
from benchmarks.common import environment
env = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
try:
    env["git"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    env["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout)
except Exception:
    pass
for mod in ("mamba_ssm", "causal_conv1d", "triton", "timm"):
    try:
        env[mod] = __import__(mod).__version__
    except Exception as exc:
        env[mod] = f"not importable ({type(exc).__name__})"
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env, indent=2))
EOF

steps_md="$res/steps.md"
printf '| step | exit | seconds |\n|---|---|---|\n' > "$steps_md"
run_step() {  # name limit command...
  local name="$1" limit="$2"; shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit} s, at $(elapsed) s): $*"
  timeout -s INT -k 15 "$limit" "$@" > "$logs/$name.log" 2>&1
  local rc=$?
  tail -n 3 "$logs/$name.log"
  [ $rc = 124 ] && echo "   (stopped at its time limit)"
  printf '| %s | %s | %s |\n' "$name" "$rc$([ $rc = 124 ] && echo ' (time limit)')" "$(( $(date +%s) - t0 ))" \
    >> "$steps_md"
  return 0
}
last_table() {  # the last markdown block (from the last "###" heading) of a log
  awk '/^### /{buf=""; keep=1} keep{buf=buf $0 "\n"} END{printf "%s", buf}' "$1"
}

# 2. GPU tests
if want tests; then
  mapfile -t files < <(gpu_test_files)
  DARTMAMBA_GPU_TABLE=0 run_step gpu-tests "$t_tests" "$py" -m pytest -q -m gpu -rs -p no:cacheprovider \
    --continue-on-collection-errors --junitxml="$res/gpu_tests.xml" "${files[@]}"
fi

# 3. benchmarks
if want table; then
  run_step model-table "$t_table" "$py" -m benchmarks.model_table --out "$res" "${table_args[@]}" \
    --time-budget $(( t_table - 40 ))
fi
if want resample; then
  run_step resample "$t_resample" "$py" benchmarks/bench_resample.py --json "$res/resample.json" "${resample_args[@]}"
  last_table "$logs/resample.log" > "$res/resample.md"
fi
if want tokenizer && [ -f benchmarks/bench_tokenizer.py ]; then
  # its options, as far as it has them: own time budget, JSON, no compile rows in a quick run, smoke run on a CPU
  tok_help="$("$py" benchmarks/bench_tokenizer.py --help 2>/dev/null)"
  has() { grep -q -- "$1" <<< "$tok_help"; }
  tok_args=()
  has "--json" && tok_args+=(--json "$res/tokenizer.json")
  has "--budget-s" && tok_args+=(--budget-s $(( t_tokenizer - 25 )))
  [ "$quick" = 1 ] && has "--no-compile" && tok_args+=(--no-compile)
  [ "$cpu_smoke" = 1 ] && has "--smoke" && tok_args+=(--smoke)
  has "--markdown" && tok_args+=(--markdown "$res/tokenizer.md")
  rm -f "$res/tokenizer.md"
  run_step tokenizer "$t_tokenizer" "$py" benchmarks/bench_tokenizer.py "${tok_args[@]}"
  [ -s "$res/tokenizer.md" ] || last_table "$logs/tokenizer.log" > "$res/tokenizer.md"
fi
if want triton; then
  run_step triton "$t_triton" "$py" benchmarks/bench_triton_ops.py --json "$res/triton.json" \
    --markdown "$res/triton.md" "${triton_args[@]}"
  [ -s "$res/triton.md" ] || last_table "$logs/triton.log" > "$res/triton.md"
fi
rest=$(( budget - $(elapsed) - 20 ))
if ! want scaling; then
  :
elif [ "$rest" -gt 60 ]; then
  # FLOPs do not depend on the device: start from the committed CPU count so no device time goes into them
  seed=benchmarks/results/flops/scaling/scaling.csv
  if [ ! -f "$res/scaling/scaling.csv" ] && [ -f "$seed" ] && [ "$cpu_smoke" != 1 ]; then
    mkdir -p "$res/scaling" && cp "$seed" "$res/scaling/scaling.csv"
  fi
  run_step scaling "$rest" "$py" -m benchmarks.scaling --metrics flops infer --amp bf16 --out "$res/scaling" \
    "${sweep_args[@]}" --time-budget $(( rest - 45 ))
else
  echo "== scaling skipped: only ${rest} s of the budget left"
  echo "| scaling | skipped (no budget left) | 0 |" >> "$steps_md"
fi

# 4. summary, printed last
summary="$res/summary.md"
{
  echo "# GPU check on $card"
  echo
  kind="full" again="bash benchmarks/gpu_check.sh"
  [ "$quick" = 1 ] && kind="quick" again="$again --quick"
  echo "$(date -u +%Y-%m-%dT%H:%MZ); torch $("$py" -c 'import torch; print(torch.__version__)'); total $(elapsed) s;" \
       "$kind run. Reproduce: \`$again\`."
  echo
  cat "$steps_md"
  echo
  if [ -f "$logs/gpu-tests.log" ]; then
    echo "### GPU tests"
    echo
    echo '```'
    grep -E "passed|failed|error|skipped|SKIPPED|FAILED|ERROR" "$logs/gpu-tests.log" | grep -v "^E " | tail -n 25
    echo '```'
    echo
  fi
  for f in "$res/model_table.md" "$res/resample.md" "$res/tokenizer.md" "$res/triton.md" "$res/scaling/summary.md"; do
    [ -s "$f" ] && { cat "$f"; echo; }
  done
} > "$summary"
if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
  mkdir -p "$OUT/$res" && cp -r "$res/." "$OUT/$res/"
  echo "(results copied to $OUT/$res)"
fi
echo
echo "================================================================================================"
cat "$summary"
