"""Smoke test of the GPU benchmark harness (benchmarks/perf_gpu) in its tiny CPU mode, so it never rots.

The harness is run for real on a GPU machine only now and then (scripts/gpu_check.sh); here every
step runs on the CPU on the tiny SD1.5 UNet, and the test checks that perf_gpu.json has every field,
that the invariants hold (the CLI agrees with the float64 reference and the naive script, the cache
is used as intended) and that the numbers are sane. Never timings.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.perf_gpu.render import targets
from benchmarks.perf_gpu.run import STEP_CAPS, TINY

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_cpu_run_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.perf_gpu", "--device", "cpu", "--tiny", "--out", str(out)]
    cmd += ["--work", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    result = json.loads((out / "perf_gpu.json").read_text())
    assert {"command", "started", "finished", "git_commit", "machine", "options", "comfyui", "families"} <= set(result)
    assert {"card", "torch", "cuda", "cpu", "cores"} <= set(result["machine"])
    assert result["machine"]["card"] is None  # no CUDA device in use
    assert result["options"]["tiny"] and result["options"]["device"] == "cpu"
    fam = result["families"]["tiny"]

    # Every step ran; only the node step may be skipped, and only without a ComfyUI to import.
    steps = fam["steps"]
    assert set(steps) == set(STEP_CAPS)
    comfy = result["comfyui"] is not None
    for name, record in steps.items():
        if name == "node" and not comfy:
            assert record["status"] == "skipped" and "ComfyUI" in record["error"]
        else:
            assert record["status"] == "ok", (name, record)

    inputs = fam["inputs"]
    layers = inputs["layers_measured"]
    assert layers == math.ceil(inputs["layers_total"] / TINY["stride"]) and layers > 0
    assert fam["startup"]["seconds"] > 0

    for run in ("cold", "warm"):
        cli = fam["cli"][run]
        assert cli["wall_s"] > 0 and cli["cpu_s"] > 0
        assert cli["excl_start_s"] == pytest.approx(cli["wall_s"] - fam["startup"]["seconds"])
        assert (cli["layers"], cli["transferred"], cli["skipped"]) == (layers, layers, 0)
        inproc = fam["inproc"][run]
        assert inproc["seconds"] > 0 and inproc["process_cpu_s"] > 0
        assert all(v >= 0 for v in inproc["phases_s"].values())
    # The cold run decomposes every base weight once; the warm run (LoRA B) reads them all from the cache.
    assert fam["inproc"]["cold"]["subspaces_computed"] == 2 * layers
    assert fam["inproc"]["warm"]["weights_read"] == 0
    assert fam["inproc"]["warm"]["cache_stats"]["hits"] == 2 * layers

    naive = fam["naive"]
    assert naive["layers"] == naive["transferred"] == layers and naive["seconds"] > 0
    assert naive["cli_cold_vs_naive"]["max"] <= 1e-4 and naive["cli_cold_vs_naive"]["layers"] == layers
    assert naive["cli_cold_decision_mismatches"] == []

    acc = fam["accuracy"]
    assert acc["layers_checked"] == acc["reference_transferred"] == layers
    assert set(acc["errors"]) == {"cli_cold", "cli_warm", "inproc_cold", "inproc_warm"}
    # cold: float32 maths against float64; warm: subspaces stored in float16 (lorax_core/cache.py).
    for label, limit in (("cli_cold", 1e-4), ("inproc_cold", 1e-4), ("cli_warm", 2e-3), ("inproc_warm", 2e-3)):
        errs = acc["errors"][label]
        assert errs["layers"] == layers and 0 <= errs["median"] <= errs["max"] <= limit, (label, errs)
        assert acc["decision_mismatches"][label] == []
    assert acc["report_status_mismatches"] == {"cli_cold": [], "cli_warm": []}

    if comfy:
        node = fam["node"]
        assert node["comfy_device"] == "cpu" and node["load_target_s"] > 0
        for run in ("cold", "warm"):
            assert node[run]["seconds"] > 0 and node[run]["peak_extra_vram_gb"] is None
            assert node[run]["transferred"] == layers
            assert node[run]["vs_cli"]["max"] <= 2e-3 and node[run]["status_mismatches_vs_cli"] == []

    assert fam["targets"] == targets(fam)
    accuracy_target = next(k for k in fam["targets"] if "float64" in k)
    assert fam["targets"][accuracy_target] is True
    assert fam["targets"]["node peak extra VRAM <= 2 GB, cold and warm"] is None  # not measured on the CPU
    md = (out / "PERF_GPU.md").read_text()
    assert "## tiny" in md and "Targets:" in md and "not measured" in md
    assert (out / "logs" / "tiny-cli_cold.log").exists()
