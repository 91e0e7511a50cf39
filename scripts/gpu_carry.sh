#!/usr/bin/env bash
# Build gpu_carry/ (git-ignored): what the GPU machine lacks for scripts/gpu_check.sh, carried along
# with the working tree (the device tool's carry=["gpu_carry"], 64 MiB at most; this stays under 60).
#
#   bash scripts/gpu_carry.sh            # → gpu_carry/{wheels/, comfyui.tar.gz, commit.txt}
#
# (a) wheels/: the packages ComfyUI v0.3.75 needs in-process (importing nodes.py, loading the pack,
#     comfy.sd) that the GPU machine (docs GPU.md: python3.12 + torch, no network) lacks. Measured by
#     importing ComfyUI with only the GPU machine's packages visible: av, torchsde and trampoline.
#     pydantic, pydantic-core, pydantic-settings, python-dotenv, typing-inspection and annotated-types
#     are not imported in-process, so they are not carried (the headless server needs them and more).
#     Same versions as this venv's, cp312 manylinux x86_64 wheels (av's is abi3), no dependencies.
# (b) comfyui.tar.gz: the ComfyUI tree (LORAX_COMFYUI, default .comfyui) without user/, output/,
#     temp/, custom_nodes/, its tests and __pycache__ (the frontend is a pip package, not in the tree,
#     and in-process nodes do not need it).
# (c) commit.txt: the commit (and whether the tree had uncommitted changes) the carry was built from;
#     the GPU machine's copy of the tree has no .git, so gpu_check.sh passes it on to the benchmark.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${LORAX_VENV:-$root/.venv}/bin/python
comfy=${LORAX_COMFYUI:-$root/.comfyui}
carry=$root/gpu_carry
limit_mib=60
wheels=(av torchsde trampoline)

log() { printf '[gpu_carry] %s\n' "$*" >&2; }

[ -f "$comfy/main.py" ] || { log "no ComfyUI at $comfy; run scripts/setup.sh or set LORAX_COMFYUI"; exit 1; }
rm -rf "$carry.partial"
mkdir -p "$carry.partial/wheels"

pins=()
for name in "${wheels[@]}"; do
  pins+=("$name==$("$py" -c 'import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))' "$name")")
done
log "downloading ${pins[*]} (cp312, manylinux x86_64)"
"$py" -m pip download --disable-pip-version-check -q --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --no-deps \
  -d "$carry.partial/wheels" "${pins[@]}" 2> >(grep -v "is neither a file nor a directory" >&2)

log "packing ComfyUI from $comfy"
tar -C "$comfy" -czf "$carry.partial/comfyui.tar.gz" \
  --exclude=./user --exclude=./output --exclude=./temp --exclude=./custom_nodes \
  --exclude=./tests --exclude=./tests-unit --exclude=__pycache__ --exclude='*.pyc' .

{
  git rev-parse HEAD
  if [ -n "$(git --no-optional-locks status --porcelain --untracked-files=no)" ]; then echo dirty; fi
} | paste -sd+ > "$carry.partial/commit.txt"

rm -rf "$carry"
mv "$carry.partial" "$carry"
du -ab "$carry" | sort -k2 >&2
bytes=$(du -sb "$carry" | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
log "gpu_carry: $bytes bytes (${mib} MiB; limit $limit_mib MiB), commit $(cat "$carry/commit.txt")"
if [ "$mib" -gt "$limit_mib" ]; then
  log "too big for the device tool's carry"
  exit 1
fi
