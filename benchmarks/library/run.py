"""Folder migration benchmark: 20 SD1.5-size LoRAs on one base pair, against single-file CLI runs.

    nice python -m benchmarks.library [--work benchmarks/work/library] [--loras 20] [--cold-samples 2]

Inputs: the SD1.5-shaped model pair of :mod:`benchmarks.perf.generate` (float16 files), and
``--loras`` LoRAs on its 160 attention/feed-forward layers with ranks cycling 4, 8, 16, 32, 64 and
key styles cycling kohya (``lora_unet_…``), PEFT (``base_model.model.….lora_A``) and ComfyUI
(``diffusion_model.…``), each with its own seed. Every run is a separate process
(``python -m benchmarks.library.run worker …``) calling ``lorax_core.cli.main`` in-process,
so that its peak RSS is its own:

* **cold**: ``transfer`` of LoRA *i* with a fresh, empty cache (as ``--cold-samples`` independent
  first runs; the 20 independent cold runs are *extrapolated* from their mean, said so in the result);
* **warm**: ``transfer`` of another LoRA with the cache the first cold run filled;
* **library**: ``migrate`` of the whole folder with a fresh, empty cache; the peak RSS after
  each file is recorded (flat in the number of LoRAs).

Targets (issue 20): library wall ≤ cold + N × warm × 1.2; ≥ 5× faster than N cold runs; peak RSS
≤ 1.3 × one fp16 model file and flat. Writes ``benchmarks/results/LIBRARY.md`` and ``library.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.perf.generate import ensure_family
from benchmarks.perf.shapes import lora_layer_keys, unet_shapes
from benchmarks.perf.worker import peak_rss_mb, subset_keys

REPO = Path(__file__).resolve().parents[2]
RANKS = (4, 8, 16, 32, 64)
STYLES = ("kohya", "peft", "comfy")
RANK_R = 320


def write_library(folder: Path, count: int, stride: int = 1) -> list[Path]:
    """``count`` LoRAs (float16, as downloaded LoRAs are) on every ``stride``-th SD1.5 attention/FF layer
    (the same layers in each, as a library trained with one recipe), mixed ranks and key styles."""
    from safetensors.torch import save_file

    shapes = unet_shapes("sd15")
    keys = subset_keys(lora_layer_keys(shapes), stride)
    paths = []
    for i in range(count):
        rank, style = RANKS[i % len(RANKS)], STYLES[i % len(STYLES)]
        path = folder / style / f"lora_{i:02d}_r{rank}.safetensors"
        paths.append(path)
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(1000 + i)
        tensors: dict[str, torch.Tensor] = {}
        for key in keys:
            m, n = shapes[key]
            down = (torch.randn(rank, n, generator=gen) / math.sqrt(n)).half()
            up = (torch.randn(m, rank, generator=gen) * 0.01).half()
            base = key.removesuffix(".weight")
            if style == "kohya":
                name = "lora_unet_" + base.replace(".", "_")
                tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                            f"{name}.alpha": torch.tensor(rank / 2)}  # fmt: skip
            elif style == "peft":
                tensors |= {
                    f"base_model.model.{base}.lora_A.weight": down,
                    f"base_model.model.{base}.lora_B.weight": up,
                }
            else:
                name = f"diffusion_model.{base}"
                tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                            f"{name}.alpha": torch.tensor(float(rank))}  # fmt: skip
        save_file(tensors, str(path))
    return paths


def worker(argv: list[str], result: Path) -> int:
    """Run ``lorax_core.cli.main(argv)`` in this process; record wall, status and peak RSS (after each file for migrate)."""
    import resource

    import lorax_core.cli as cli

    per_file: list[float] = []
    migrate = cli.migrate_library

    def recording(*args: object, on_row=None, **kwargs: object):  # type: ignore[no-untyped-def]
        def row(index: int, total: int, r: object) -> None:
            per_file.append(peak_rss_mb())
            if on_row is not None:
                on_row(index, total, r)

        return migrate(*args, on_row=row, **kwargs)

    cli.migrate_library = recording  # type: ignore[assignment]
    t = time.perf_counter()
    status = cli.main(argv)
    wall = time.perf_counter() - t
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result.write_text(json.dumps({"status": status, "seconds": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                                  "peak_rss_mb": peak_rss_mb(), "rss_after_each_file_mb": per_file}))  # fmt: skip
    return 0


def _run(args: list[str], work: Path, name: str, reuse: bool = False) -> dict[str, object]:
    """One worker process (or, with ``reuse``, the result an earlier run of the same step left)."""
    result = work / f"{name}.json"
    if reuse and result.exists():
        out = json.loads(result.read_text())
        print(f"{name}: reusing {result} ({out['seconds']:.1f} s, {out['cpu_s']:.1f} s CPU)", flush=True)
        return out
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.library.run", "worker", str(result), "--", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, check=False)  # fmt: skip
    wall = time.perf_counter() - t
    if proc.returncode != 0 or not result.exists():
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    out = json.loads(result.read_text())
    out["process_wall_s"] = wall
    result.write_text(json.dumps(out))
    out["stdout_tail"] = proc.stdout.strip().splitlines()[-3:]
    print(f"{name}: {wall:.1f} s wall, {out['cpu_s']:.1f} s CPU, status {out['status']}, "
          f"peak RSS {out['peak_rss_mb']:.0f} MiB", flush=True)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "library")
    p.add_argument("--loras", type=int, default=20)
    p.add_argument("--cold-samples", type=int, default=2)
    p.add_argument("--stride", type=int, default=1, help="LoRAs patch every STRIDE-th of the 160 layers (default: all)")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--reuse", action="store_true", help="keep the results of steps an interrupted run finished")
    args = p.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    models = ensure_family(REPO / "benchmarks" / "work" / "perf", "sd15", print)
    source, target = models / "source.safetensors", models / "target.safetensors"
    folder = work / ("loras" if args.stride == 1 else f"loras_stride{args.stride}")
    loras = write_library(folder, args.loras, args.stride)
    layers = len(subset_keys(lora_layer_keys(unet_shapes("sd15")), args.stride))
    runs: dict[str, object] = {}

    def fresh(name: str) -> Path:
        if not (args.reuse and (work / f"{name}.json").exists()):
            shutil.rmtree(work / name, ignore_errors=True)
            (work / name).mkdir(parents=True)
        return work / name

    base = ["--source", str(source), "--target", str(target), "--rank", str(RANK_R), "--quiet"]
    colds = []
    for i in range(args.cold_samples):
        d = fresh(f"cold{i}")
        colds.append(_run(["transfer", *base, "--lora", str(loras[i]), "--out", str(d / "out.safetensors"),
                           "--cache-dir", str(d / "cache")], work, f"cold{i}", args.reuse))  # fmt: skip
    warms = []
    for i in (1, 2):
        d = work / "cold0"
        warms.append(_run(["transfer", *base, "--lora", str(loras[i]), "--out", str(d / f"warm{i}.safetensors"),
                           "--cache-dir", str(d / "cache")], work, f"warm{i}", args.reuse))  # fmt: skip
    d = fresh("library")
    library = _run(["migrate", *base, "--lora-dir", str(folder), "--out-dir", str(d / "out"),
                    "--cache-dir", str(d / "cache")], work, "library", args.reuse)  # fmt: skip
    runs = {"cold": colds, "warm": warms, "library": library}

    n = args.loras
    # Wall time of the command itself (lorax_core.cli.main), without the interpreter start: the same
    # measure for every run, and conservative for both targets (each of the N independent runs and
    # each warm run would pay a start too).
    cold = colds[0]["seconds"]
    cold_mean = sum(c["seconds"] for c in colds) / len(colds)
    warm = sum(w["seconds"] for w in warms) / len(warms)
    lib = library["seconds"]
    file_mb = source.stat().st_size / 1024**2
    rss = library["rss_after_each_file_mb"]
    cpu_cold, cpu_warm = colds[0]["cpu_s"], sum(w["cpu_s"] for w in warms) / len(warms)
    cpu_cold_mean = sum(c["cpu_s"] for c in colds) / len(colds)
    cpu_lib = library["cpu_s"]
    budget = cold + n * warm * 1.2
    independent = n * cold_mean
    targets = [
        (f"library wall ≤ cold + {n} × warm × 1.2", f"{lib:.1f} s", f"≤ {budget:.1f} s", lib <= budget),
        (f"≥ 5× faster than {n} independent cold runs (extrapolated: {n} × mean of {len(colds)} measured)",
         f"{independent / lib:.1f}×", "≥ 5×", independent / lib >= 5),
        (f"(CPU seconds, less sensitive to the shared machine's load) library ≤ cold + {n} × warm × 1.2",
         f"{cpu_lib:.1f} s", f"≤ {cpu_cold + n * cpu_warm * 1.2:.1f} s", cpu_lib <= cpu_cold + n * cpu_warm * 1.2),
        (f"(CPU seconds) ≥ 5× less than {n} independent cold runs (extrapolated)",
         f"{n * cpu_cold_mean / cpu_lib:.1f}×", "≥ 5×", n * cpu_cold_mean / cpu_lib >= 5),
        ("peak RSS ≤ 1.3 × fp16 model file", f"{library['peak_rss_mb']:.0f} MiB", f"≤ {1.3 * file_mb:.0f} MiB",
         library["peak_rss_mb"] <= 1.3 * file_mb),
        ("peak RSS flat in the number of LoRAs (after file 2 vs after the last)",
         f"{rss[1]:.0f} → {rss[-1]:.0f} MiB", "≤ +5 %", rss[-1] <= rss[1] * 1.05),
    ]  # fmt: skip
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs visible ({platform.processor() or 'cpu'}), torch {torch.__version__}"
    record = {"machine": machine, "loras": n, "layers_per_lora": layers, "stride": args.stride, "model_file_mb": file_mb, "runs": runs,
              "targets": [{"target": t, "measured": m, "limit": lim, "met": ok} for t, m, lim, ok in targets]}  # fmt: skip
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "library.json").write_text(json.dumps(record, indent=2))
    command = "nice python -m benchmarks.library" + "".join(
        f" --{k.replace('_', '-')} {v}"
        for k, v in (("loras", n), ("cold_samples", len(colds)), ("stride", args.stride))
    )
    lines = [
        f"# Folder migration: {n} SD1.5-size LoRAs on one base pair",
        "",
        f"Command: `{command}` (see `benchmarks/library/run.py` for what each run is).",
        f"Machine: {machine}; shared with other jobs (timings vary with their load).",
        f"Model files: SD1.5-shaped UNet pair, float16, {file_mb:.0f} MiB each; subspace rank {RANK_R}.",
        f"LoRAs: {n}, ranks {', '.join(map(str, RANKS))} (cycling), key styles kohya / PEFT / ComfyUI (cycling), "
        f"{layers} layers each (every {args.stride}th of the 160 attention/feed-forward layers, the same in every LoRA).",
        "",
        "| run | wall of the command (s) | CPU (s) | peak RSS (MiB) | exit status |",
        "|---|---|---|---|---|",
        *[f"| {label} | {r['seconds']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['status']} |"
          for label, r in [*[(f"cold transfer #{i} (fresh cache)", c) for i, c in enumerate(colds)],
                           *[(f"warm transfer #{i} (cache of cold #0)", w) for i, w in enumerate(warms)],
                           (f"migrate, {n} LoRAs (fresh cache)", library)]],
        "",
        f"Peak RSS after each file of the migration (MiB): {', '.join(f'{v:.0f}' for v in rss)}.",
        "",
        f"The {n} independent cold runs are **extrapolated** from the {len(colds)} measured ({n} × {cold_mean:.1f} s"
        f" = {independent:.0f} s), not run.",
        "",
        "| target | measured | limit | met |",
        "|---|---|---|---|",
        *[f"| {t} | {m} | {lim} | {'met' if ok else 'MISSED'} |" for t, m, lim, ok in targets],
    ]  # fmt: skip
    (args.results / "LIBRARY.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        raise SystemExit(worker(sys.argv[4:], Path(sys.argv[2])))
    raise SystemExit(main())
