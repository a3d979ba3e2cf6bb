#!/usr/bin/env bash
# Set up the environment (first run: a few minutes) and run the main job: the demo.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$repo/scripts/setup_env.sh")"
cd "$repo"
exec "$py" -m dartmamba.demos.tokenize_photos --out outputs/dart_tokens.png "$@"
