"""Speed and memory benchmark of LoRA transfer at SD1.5 and SDXL scale: one command.

    .venv/bin/python -m benchmarks.perf                      # both families, every LoRA layer
    .venv/bin/python -m benchmarks.perf --stride sd15=7 sdxl=33   # documented layer subsets
    .venv/bin/python -m benchmarks.perf --tiny               # seconds-long smoke run (tests/perf)

For each family it generates (or reuses) the model pair and LoRAs (:mod:`benchmarks.perf.generate`,
into ``benchmarks/work/``), reads both model files once so every run starts with the same page
cache, then runs, each in its own process (:mod:`benchmarks.perf.worker`):

1. ``cold``  – the product (``lorax_core``), LoRA A, empty :class:`~lorax_core.cache.DiskCache`;
2. ``warm``  – the product, LoRA B (different weights), the cache ``cold`` filled;
3. ``naive`` – :mod:`benchmarks.perf.naive` on LoRA A, then (untimed) a per-layer comparison of
   the product's cold output with it, and of the warm output with the naive result for LoRA B;
4. ``scaling`` (SD1.5 and tiny) – cold and warm time vs number of layers and vs LoRA rank.

Peak RSS is the whole process's (``/usr/bin/time -v`` when present, else ``ru_maxrss``).
Results: ``benchmarks/results/perf.json`` (the fields of issue 5, plus ``machine`` and ``command``),
``perf_detail.json`` (phases, CPU times, load averages, subsets, errors per run) and the table
in ``PERF.md`` (between the ``perf:begin``/``perf:end`` markers; the text around them is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .generate import LORA_RANK, SCALING_FAMILIES, ensure_family
from .shapes import lora_layer_keys, unet_shapes

ROOT = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
# Comparison tolerances (relative Frobenius error of each layer's ΔW against the naive result).
# cold: float32 maths on both sides; the naive float32 SVD's own error at the rank-R cut sets the floor.
# warm: the subspaces come from the float16 disk cache (lorax_core/cache.py: ≈ 4e-4 measured).
TOL_COLD = 1e-4
TOL_WARM = 2e-3


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict[str, object]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    except (ValueError, OSError, AttributeError):
        pass
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }


def run_worker(args: list[str], result: Path) -> dict[str, object]:
    """Run one worker process; returns its JSON plus wall time, load and /usr/bin/time's peak RSS."""
    cmd = [sys.executable, "-m", "benchmarks.perf.worker", *args, "--result", str(result)]
    timer = shutil.which("time") if Path("/usr/bin/time").exists() else None
    if timer:
        cmd = ["/usr/bin/time", "-v", *cmd]
    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    out = json.loads(result.read_text())
    out["process_wall_s"] = wall
    out["loadavg_1min"] = [load_before, os.getloadavg()[0]]
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if found:
        out["peak_rss_mb_time_v"] = int(found.group(1)) / 1024.0
    return out


def _peak(run: dict[str, object]) -> float:
    return round(float(run.get("peak_rss_mb_time_v", run["peak_rss_mb"])), 1)  # type: ignore[arg-type]


def bench_family(family: str, work: Path, stride: int, threads: int, rank: int, scaling: bool) -> dict[str, object]:
    fam_dir = ensure_family(work, family, log)
    keys_all = ["diffusion_model." + k for k in lora_layer_keys(unet_shapes(family))]
    keys = sorted(keys_all)[::stride]
    run_dir = fam_dir / "runs"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    keys_file = run_dir / "keys.json"
    keys_file.write_text(json.dumps(keys))
    common = ["--family-dir", str(fam_dir), "--work", str(run_dir), "--threads", str(threads), "--rank", str(rank)]
    subset = [] if stride == 1 else ["--keys", str(keys_file)]
    for name in ("source.safetensors", "target.safetensors"):
        with (fam_dir / name).open("rb") as fh:  # same page-cache state for every run
            while fh.read(64 << 20):
                pass
    cache = run_dir / "cache"
    out_a, out_b = run_dir / "out_cold.safetensors", run_dir / "out_warm.safetensors"
    log(f"{family}: cold ({len(keys)} of {len(keys_all)} layers)")
    cold = run_worker(["lorax", *common, *subset, "--cache", str(cache), "--out", str(out_a)], run_dir / "cold.json")
    log(f"{family}: cold {cold['seconds']:.1f}s; warm")
    warm = run_worker(
        ["lorax", *common, *subset, "--lora", "lora_b", "--cache", str(cache), "--out", str(out_b)],
        run_dir / "warm.json",
    )
    log(f"{family}: warm {warm['seconds']:.1f}s; naive")
    naive = run_worker(
        ["naive", *common, *subset, "--compare-a", str(out_a), "--compare-b", str(out_b)], run_dir / "naive.json"
    )
    log(f"{family}: naive {naive['seconds']:.1f}s")
    detail: dict[str, object] = {
        "layers_total": len(keys_all),
        "layers_measured": len(keys),
        "subset": "all" if stride == 1 else f"every {stride}th LoRA layer of the sorted tensor names",
        "rank_R": rank,
        "threads": threads,
        "cache_bytes_after_cold": sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()),
        "cold": cold,
        "warm": warm,
        "naive": naive,
    }
    if scaling and family in SCALING_FAMILIES:
        log(f"{family}: scaling table")
        detail["scaling"] = run_worker(["scaling", *common], run_dir / "scaling.json")["rows"]
    errs = naive["max_rel_err"]  # type: ignore[index]
    summary = {
        "layers": len(keys),
        "lora_rank": LORA_RANK,
        "model_file_mb": round((fam_dir / "source.safetensors").stat().st_size / 1024**2, 1),
        "naive_s": round(float(naive["seconds"]), 2),  # type: ignore[arg-type]
        "cold_s": round(float(cold["seconds"]), 2),  # type: ignore[arg-type]
        "warm_s": round(float(warm["seconds"]), 2),  # type: ignore[arg-type]
        "peak_rss_mb": {"naive": _peak(naive), "cold": _peak(cold), "warm": _peak(warm)},
        "max_rel_err_vs_naive": max(v for v in errs.values() if v is not None),  # type: ignore[union-attr]
    }
    return {"summary": summary, "detail": detail}


def targets(s: dict[str, object], d: dict[str, object]) -> dict[str, bool]:
    errs = d["naive"]["max_rel_err"]  # type: ignore[index]
    mism = d["naive"]["decision_mismatches"]  # type: ignore[index]
    rss: dict[str, float] = s["peak_rss_mb"]  # type: ignore[assignment]
    size = float(s["model_file_mb"])  # type: ignore[arg-type]
    return {
        "cold <= 0.5x naive": float(s["cold_s"]) <= 0.5 * float(s["naive_s"]),  # type: ignore[arg-type]
        "warm <= 0.05x naive": float(s["warm_s"]) <= 0.05 * float(s["naive_s"]),  # type: ignore[arg-type]
        "peak RSS (cold, warm) <= 1.3x fp16 model file": max(rss["cold"], rss["warm"]) <= 1.3 * size,
        f"cold within {TOL_COLD:g} of naive, same skip decisions": (errs["cold"] or 0.0) <= TOL_COLD
        and not mism["cold"],
        f"warm within {TOL_WARM:g} of naive (fp16 cache), same skip decisions": (errs["warm"] or 0.0) <= TOL_WARM
        and not mism["warm"],
    }


def render(perf: dict[str, object], detail: dict[str, object]) -> str:
    lines = [
        BEGIN,
        "",
        f"Command: `{perf['command']}`  ",
        f"Machine: {perf['machine']['cpu']}, {perf['machine']['cores']} cores, "  # type: ignore[index]
        f"{perf['machine']['memory_gb']} GB, torch {perf['machine']['torch']}, "  # type: ignore[index]
        f"CUDA available: {perf['machine']['cuda']}",  # type: ignore[index]
        "",
        "| model | layers measured | model file (MB) | naive (s) | cold (s) | warm (s) | cold/naive | warm/naive "
        "| peak RSS naive / cold / warm (MB) | RSS cold/file | max rel. err cold / warm |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fam in ("sd15", "sdxl", "tiny"):
        if fam not in perf:
            continue
        s, d = perf[fam], detail[fam]
        rss = s["peak_rss_mb"]  # type: ignore[index]
        errs = d["naive"]["max_rel_err"]  # type: ignore[index]
        lines.append(
            f"| {fam} | {s['layers']} of {d['layers_total']} ({d['subset']}) | {s['model_file_mb']} | "  # type: ignore[index]
            f"{s['naive_s']} | {s['cold_s']} | {s['warm_s']} | {s['cold_s'] / s['naive_s']:.2f} | "  # type: ignore[index,operator]
            f"{s['warm_s'] / s['naive_s']:.3f} | {rss['naive']} / {rss['cold']} / {rss['warm']} | "  # type: ignore[index,operator]
            f"{max(rss['cold'], rss['warm']) / s['model_file_mb']:.2f} | "  # type: ignore[index,operator]
            f"{errs['cold']:.2e} / {errs['warm']:.2e} |"
        )
    lines += [
        "",
        "Where the cold/warm time goes (seconds, from wrappers around the product's WeightSource and cache):",
        "",
    ]
    lines += [
        "| model | run | wall | process CPU | read weights | decompose | cache I/O | maths+similarity | "
        "write | load avg (start→end) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fam in ("sd15", "sdxl", "tiny"):
        if fam not in detail:
            continue
        for run in ("cold", "warm"):
            r = detail[fam][run]  # type: ignore[index]
            ph = r["phases_s"]
            load = r["loadavg_1min"]
            lines.append(
                f"| {fam} | {run} | {r['seconds']:.1f} | {r['process_cpu_s']:.1f} | {ph['read_base_weights']:.1f} | "
                f"{ph['decompose']:.1f} | {ph['cache_io']:.1f} | {ph['transfer_maths_and_similarity']:.1f} | "
                f"{ph['write_output']:.1f} | {load[0]:.1f}→{load[1]:.1f} |"
            )
        n = detail[fam]["naive"]  # type: ignore[index]
        load = n["loadavg_1min"]
        lines.append(
            f"| {fam} | naive | {n['seconds']:.1f} | {n['process_cpu_s']:.1f} | | | | | | {load[0]:.1f}→{load[1]:.1f} |"
        )
    for fam in ("sd15", "tiny"):
        rows = detail.get(fam, {}).get("scaling")  # type: ignore[union-attr]
        if not rows:
            continue
        lines += ["", f"Scaling ({fam}; each row: a fresh cache, then a second LoRA with the cache filled):", ""]
        lines += ["| LoRA layers | LoRA rank | cold (s) | warm (s) | cold: decompose (s) | warm: cache I/O (s) |"]
        lines += ["|---|---|---|---|---|---|"]
        for row in rows:
            lines.append(
                f"| {row['layers']} | {row['lora_rank']} | {row['cold_s']:.1f} | {row['warm_s']:.1f} | "
                f"{row['cold_decompose_s']:.1f} | {row['warm_cache_io_s']:.1f} |"
            )
    lines += ["", "Targets (this run):", ""]
    for fam in ("sd15", "sdxl", "tiny"):
        if fam in perf:
            for name, ok in targets(perf[fam], detail[fam]).items():  # type: ignore[arg-type]
                lines.append(f"- {fam}: {name}: {'met' if ok else 'NOT met'}")
    lines += ["", END]
    return "\n".join(lines)


def write_results(results: Path, perf: dict[str, object], detail: dict[str, object], tiny: bool) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "perf.json").write_text(json.dumps(perf, indent=2) + "\n")
    (results / "perf_detail.json").write_text(json.dumps(detail, indent=2) + "\n")
    md = results / "PERF.md"
    block = render(perf, detail)
    if md.exists() and BEGIN in md.read_text():
        text = md.read_text()
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1] if END in rest else ""
        md.write_text(head + block + tail)
    else:
        title = "Perf smoke run (tiny)" if tiny else "Performance: LoRA transfer at SD1.5/SDXL scale"
        md.write_text(f"# {title}\n\n{block}\n")


def parse_strides(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        fam, _, value = item.partition("=")
        if not value.isdigit() or int(value) < 1:
            raise SystemExit(f"--stride expects FAMILY=N with N >= 1, e.g. sdxl=33; got {item!r}")
        out[fam] = int(value)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf", description=__doc__.split("\n")[0])
    p.add_argument("--families", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl", "tiny"])
    p.add_argument("--stride", nargs="*", default=[], help="FAMILY=N: measure every N-th LoRA layer only")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run (default: %(default)s)")
    p.add_argument("--rank", type=int, default=320, help="subspace rank R (default: %(default)s, the paper's)")
    p.add_argument("--no-scaling", action="store_true", help="skip the scaling table")
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--tiny", action="store_true", help="smoke mode: the tiny family only, R = 8")
    args = p.parse_args(argv)
    if args.tiny:
        args.families, args.rank = ["tiny"], 8
    strides = parse_strides(args.stride)
    command = "python -m benchmarks.perf" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    perf: dict[str, object] = {}
    detail: dict[str, object] = {}
    for fam in args.families:
        res = bench_family(fam, args.work, strides.get(fam, 1), args.threads, args.rank, not args.no_scaling)
        perf[fam], detail[fam] = res["summary"], res["detail"]
        perf["machine"], perf["command"] = machine(), command
        write_results(args.results, perf, detail, args.tiny)  # after each family, so partial runs count
    log(f"wrote {args.results / 'perf.json'} and {args.results / 'PERF.md'}")
    return 0
