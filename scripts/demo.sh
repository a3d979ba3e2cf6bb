#!/usr/bin/env bash
# Set up the environment (first run: a few minutes) and run the main job: the training demo.
# Trains a small Vim-DART and the same Vim with a fixed grid (16 tokens each) on cluttered canvases of
# scikit-learn's digits, on CPU (about 2 minutes on 2 cores), then writes outputs/demo/dart_tokens.png and prints
# the accuracies. Extra arguments go to the demo (e.g. --out DIR, or key=value config overrides for both runs).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$repo/scripts/setup_env.sh")"
cd "$repo"
exec "$py" -m dartmamba_train.demo --out outputs/demo "$@"
