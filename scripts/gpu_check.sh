#!/usr/bin/env bash
# Every GPU step of issue 9 in one call on the GPU machine (benchmarks/perf_gpu/README.md):
#
#   run(command="bash scripts/gpu_check.sh", carry=["gpu_carry"], timeout_s=540)
#
# From the repo root, with gpu_carry/ (bash scripts/gpu_carry.sh) carried along. Everything it
# writes goes under $OUT (set by the device tool; default ./gpu_out). Each step is time-boxed and
# a failing step does not stop the next; the whole ends within GPU_CHECK_BUDGET_S (default 460 s):
#
#   0. the carried wheels (av, torchsde, trampoline) into a temp dir on PYTHONPATH (pip --no-index
#      --no-deps --target; unzipped if pip is missing), ComfyUI unpacked into a temp dir, the pack
#      linked into its custom_nodes/; LORAX_COMFYUI points there (tests/nodes and the benchmark read it);
#   1. in the background, while 2 and 3 run: the full-size models (benchmarks.perf_gpu --generate-only,
#      benchmarks/perf/generate.py: CPU-bound, minutes for SDXL), so the GPU is not idle meanwhile;
#   2. python -m pytest tests/perf/test_perf_gpu.py tests/unit (CUDA visible: the gpu tests run);
#   3. the node tier with ComfyUI on cuda:0 (pytest -p benchmarks.perf_gpu.comfy_on_gpu). Not all of
#      it: test_nodes.py, test_cli_node_agree.py and test_cache_option.py (26 tests) run every node of
#      the transfer path on the device ComfyUI picks, the node/CLI agreement and the GPU-computed
#      subspaces going through the disk cache. The other files cover families, formats, training and
#      refinement, whose device handling these already exercise, and need minutes more (67 tests took
#      7.5 min on 2 CPU cores) or files made by diffusers/PEFT, which the GPU machine lacks;
#   4. python -m benchmarks.perf_gpu --device cuda --out $OUT/perf_gpu with the time that is left:
#      SDXL first (all 700 LoRA layers: the issue's target), then SD1.5 (160), every layer; a step
#      that no longer fits is recorded as skipped (see perf_gpu.json), the figures so far are kept;
#   5. a summary on stdout (test results, step statuses, PERF_GPU.md): the device tool's output tail.
#
# GPU_CHECK_SMOKE=1 runs the same plumbing on a CPU machine: device cpu, --tiny, a few tests, the
# venv's python (ComfyUI, without --cpu, then falls back to the CPU by itself). Overrides: PYTHON, GPU_CHECK_BUDGET_S, GPU_CHECK_UNIT_TESTS, GPU_CHECK_NODE_TESTS,
# GPU_CHECK_PERF_ARGS (e.g. "--families sdxl --stride sdxl=2").
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
start=$SECONDS
smoke=${GPU_CHECK_SMOKE:-0}
budget=${GPU_CHECK_BUDGET_S:-460}
out=${OUT:-$root/gpu_out}
out=$(mkdir -p "$out" && cd "$out" && pwd)
carry=$root/gpu_carry
tmp=$(mktemp -d "${TMPDIR:-/tmp}/lorax_gpu_check.XXXXXX")
if [ "$smoke" = 1 ]; then
  py=${PYTHON:-$root/.venv/bin/python}
  device=cpu
  unit_tests=${GPU_CHECK_UNIT_TESTS:-tests/perf/test_perf_gpu.py tests/unit/test_linalg.py}
  node_tests=${GPU_CHECK_NODE_TESTS:-tests/nodes/test_cli_node_agree.py}
  perf_args=${GPU_CHECK_PERF_ARGS:---tiny}
else
  py=${PYTHON:-python3}
  device=cuda
  unit_tests=${GPU_CHECK_UNIT_TESTS:-tests/perf/test_perf_gpu.py tests/unit}
  node_tests=${GPU_CHECK_NODE_TESTS:-tests/nodes/test_nodes.py tests/nodes/test_cli_node_agree.py tests/nodes/test_cache_option.py}
  perf_args=${GPU_CHECK_PERF_ARGS:---families sdxl sd15}
fi
read -r -a unit_tests <<< "$unit_tests"
read -r -a node_tests <<< "$node_tests"
read -r -a perf_args <<< "$perf_args"

log() { printf '[gpu_check %3ds] %s\n' "$((SECONDS - start))" "$*" | tee -a "$out/gpu_check.log" >&2; }
left() { echo $((budget - (SECONDS - start))); }
# run_boxed LIMIT_S LOG CMD...: CMD with a time limit, output to LOG; logs and returns its status.
run_boxed() {
  local limit=$1 file=$2 status
  shift 2
  if [ "$limit" -lt 10 ]; then
    log "skipped (time budget spent): $*"
    echo "skipped: time budget spent" > "$file"
    return 124
  fi
  log "running (up to ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$file" 2>&1
  status=$?
  log "exit status $status$([ "$status" = 124 ] && echo ' (time limit)'): $*"
  return "$status"
}
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

log "repo $root, out $out, smoke=$smoke, budget ${budget}s, python $py"
[ -d "$carry" ] || log "WARNING: no gpu_carry/ (bash scripts/gpu_carry.sh, then carry it): ComfyUI steps will fail"
{ nvidia-smi 2>&1 || echo "nvidia-smi: not available"; } > "$out/nvidia-smi.txt"
"$py" -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, "CUDA", torch.version.cuda,
  "available:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' \
  2>&1 | tee "$out/python.txt" | while read -r line; do log "python: $line"; done

# 0. wheels, ComfyUI, the pack in its custom_nodes/
site=$tmp/site
mkdir -p "$site"
if ls "$carry"/wheels/*.whl > /dev/null 2>&1; then
  if ! "$py" -m pip install --disable-pip-version-check -q --no-index --no-deps --target "$site" "$carry"/wheels/*.whl \
      > "$out/pip.log" 2>&1; then
    log "pip failed (see pip.log); unzipping the wheels instead"
    for whl in "$carry"/wheels/*.whl; do "$py" -m zipfile -e "$whl" "$site"; done
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  log "wheels: $(cd "$carry/wheels" && ls | tr '\n' ' ')"
fi
comfy=$tmp/comfyui
if [ -f "$carry/comfyui.tar.gz" ]; then
  mkdir -p "$comfy/custom_nodes"
  tar -xzf "$carry/comfyui.tar.gz" -C "$comfy"
  ln -sfn "$root" "$comfy/custom_nodes/comfyui_lorax"
  export LORAX_COMFYUI=$comfy
  log "ComfyUI unpacked at $comfy"
fi
if [ -f "$carry/commit.txt" ]; then
  LORAX_GIT_COMMIT=$(cat "$carry/commit.txt")
  export LORAX_GIT_COMMIT
fi

# 1. models, in the background
run_boxed "$(left)" "$out/generate.log" "$py" -m benchmarks.perf_gpu --generate-only --device "$device" "${perf_args[@]}" &
gen_pid=$!

# 2. unit tests and the GPU tests
run_boxed "$(min 120 "$(left)")" "$out/pytest_unit.log" \
  "$py" -m pytest -p no:cacheprovider -q -rfE "${unit_tests[@]}"
unit_status=$?

# 3. the node tier with ComfyUI on the GPU
run_boxed "$(min 150 "$(left)")" "$out/pytest_nodes.log" \
  "$py" -m pytest -p no:cacheprovider -p benchmarks.perf_gpu.comfy_on_gpu -v -rfE "${node_tests[@]}"
node_status=$?

# 4. the benchmark, with what is left (minus a margin for the summary)
wait "$gen_pid"
gen_status=$?
perf_left=$(( $(left) - 15 ))
if [ "$perf_left" -lt 30 ]; then
  log "perf_gpu skipped: ${perf_left}s left"
  echo "skipped: time budget spent" > "$out/perf_gpu.log"
  perf_status=124
else
  # --budget-s bounds its steps; the outer limit only catches a step that ignores its own.
  run_boxed "$((perf_left + 30))" "$out/perf_gpu.log" \
    "$py" -m benchmarks.perf_gpu --device "$device" --out "$out/perf_gpu" --budget-s "$perf_left" "${perf_args[@]}"
  perf_status=$?
fi

# 5. summary
rm -rf "$tmp"
{
  echo "=== gpu_check: generate $gen_status, unit tests $unit_status, node tests $node_status, perf_gpu $perf_status," \
    "$((SECONDS - start)) s"
  cat "$out/python.txt"
  echo "--- unit tests (tail)"; tail -n 8 "$out/pytest_unit.log"
  echo "--- node tests (device line, tail)"
  grep -m1 "ComfyUI device" "$out/pytest_nodes.log"
  tail -n 8 "$out/pytest_nodes.log"
  echo "--- perf_gpu (log tail)"; tail -n 6 "$out/perf_gpu.log"
  [ -f "$out/perf_gpu/PERF_GPU.md" ] && cat "$out/perf_gpu/PERF_GPU.md"
} | tee "$out/summary.txt"
[ "$unit_status" = 0 ] && [ "$node_status" = 0 ] && [ "$perf_status" = 0 ]
