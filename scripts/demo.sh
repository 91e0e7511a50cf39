#!/usr/bin/env bash
# The main job: build the environment if needed, generate tiny demo models, run the example
# workflows on a headless ComfyUI over its HTTP API, and leave the transferred LoRA, its report
# and the generated images in out/demo/ (printed at the end).
#
#   bash scripts/demo.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
venv=${LORAX_VENV:-$root/.venv}
export LORAX_COMFYUI=${LORAX_COMFYUI:-$root/.comfyui}
exec "$venv/bin/python" scripts/demo.py "$@"
