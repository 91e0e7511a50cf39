#!/usr/bin/env bash
# Run the whole test suite (every tier: maths, formats, CLI, nodes in-process, headless
# ComfyUI over HTTP, benchmark smoke tests). Builds the environment first if needed.
#
#   bash scripts/test.sh [extra pytest args]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
venv=${LORAX_VENV:-$root/.venv}
export LORAX_COMFYUI=${LORAX_COMFYUI:-$root/.comfyui}
"$venv/bin/ruff" check .
"$venv/bin/python" -m pytest tests "$@"
