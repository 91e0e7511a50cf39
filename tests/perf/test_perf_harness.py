"""Smoke test of the perf benchmark harness (benchmarks/perf) in its tiny mode, so it never rots.

Checks that one run completes and that its invariants hold (the product's results equal the naive
reference, the cache is used as intended, the result files have their fields); never timings.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.perf.shapes import lora_layer_keys, unet_shapes

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("family", "tensors", "params", "lora_layers"),
    [("sd15", 686, 859_520_964, 160), ("sdxl", 1680, 2_567_463_684, 700)],
)
def test_unet_shapes_match_the_published_models(family: str, tensors: int, params: int, lora_layers: int) -> None:
    # Counts checked once against ComfyUI v0.3.75's UNetModel built on the meta device.
    shapes = unet_shapes(family)
    assert len(shapes) == tensors
    assert sum(math.prod(s) for s in shapes.values()) == params
    keys = lora_layer_keys(shapes)
    assert len(keys) == lora_layers
    assert all(len(shapes[k]) == 2 for k in keys)


@pytest.mark.slow
def test_tiny_benchmark_runs_and_agrees_with_naive(tmp_path: Path) -> None:
    work, results = tmp_path / "work", tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.perf",
        "--tiny",
        "--no-scaling",
        "--threads",
        "1",
        "--work",
        str(work),
        "--results",
        str(results),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    perf = json.loads((results / "perf.json").read_text())
    assert set(perf) == {"tiny", "machine", "command"}
    tiny = perf["tiny"]
    assert set(tiny) == {
        "layers",
        "lora_rank",
        "model_file_mb",
        "naive_s",
        "cold_s",
        "warm_s",
        "peak_rss_mb",
        "max_rel_err_vs_naive",
    }
    assert set(tiny["peak_rss_mb"]) == {"naive", "cold", "warm"}
    assert all(v > 0 for v in tiny["peak_rss_mb"].values())
    assert tiny["layers"] == len(lora_layer_keys(unet_shapes("tiny")))

    detail = json.loads((results / "perf_detail.json").read_text())["tiny"]
    naive = detail["naive"]
    # cold: float32 subspaces on both sides; warm: float16 cache entries (lorax_core/cache.py).
    assert naive["max_rel_err"]["cold"] <= 1e-4
    assert naive["max_rel_err"]["warm"] <= 2e-3
    assert naive["compared_layers"]["cold"] == tiny["layers"] - naive["skipped"]
    assert naive["decision_mismatches"] == {"cold": [], "warm": []}
    # The cold run decomposes every base weight once and stores it; the warm run computes nothing.
    assert detail["cold"]["cache_stats"]["misses"] == 2 * tiny["layers"]
    assert detail["warm"]["cache_stats"] == {**detail["warm"]["cache_stats"], "hits": 2 * tiny["layers"], "misses": 0}
    assert detail["warm"]["weights_read"] == 0
    assert "| tiny |" in (results / "PERF.md").read_text()
