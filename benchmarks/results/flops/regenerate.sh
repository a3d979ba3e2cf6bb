#!/usr/bin/env bash
# Recount every committed FLOP table in this folder (fake tensors: CPU only, about two minutes in all).
#   bash benchmarks/results/flops/regenerate.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
out=benchmarks/results/flops
py="${PYTHON:-python}"
full='{"dart_cfg": {"scorer_input_size": 448}}'
"$py" -m benchmarks.flops --csv $out/flops_196.csv --md $out/flops_196.md \
    --title "registered defaults (the DART scorer sees a 224 resize of the 448 input)"
"$py" -m benchmarks.flops --tokenizers dart --dart-kwargs "$full" --csv $out/flops_196_scorer448.csv \
    --md $out/flops_196_scorer448.md --title "DART with the scorer on the full 448 input"
"$py" -m benchmarks.flops --families vim --sizes ti s --tokens 392 784 --csv $out/flops_long_vim.csv \
    --md $out/flops_long_vim.md --title "the DART README's long-sequence Vim rows (registered defaults)"
"$py" -m benchmarks.flops --families deit --sizes ti s --tokens 392 576 --csv $out/flops_long_deit.csv \
    --md $out/flops_long_deit.md --title "the DART README's long-sequence DeiT rows (registered defaults)"
"$py" -m benchmarks.flops --tokenizers dart --sizes ti s --tokens 392 --dart-kwargs "$full" \
    --csv $out/flops_long_scorer448.csv --md $out/flops_long_scorer448.md \
    --title "long-sequence DART rows, scorer on the full 448 input"
rm -rf $out/scaling
"$py" -m benchmarks.scaling --metrics flops --out $out/scaling
