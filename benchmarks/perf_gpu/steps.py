"""The naive and accuracy steps of :mod:`benchmarks.perf_gpu.run`, each in a child process of its own.

    python -m benchmarks.perf_gpu.steps naive|accuracy --spec RUN/spec.json --result R.json [--time-limit S]

* ``naive`` – the paper's recipe as a script would run it (:mod:`benchmarks.perf.naive`: dense ΔW,
  full float32 ``torch.linalg.svd`` of both weights per layer) on the compute device, on LoRA A and
  the measured layers; timed as ``naive_transfer`` times it (loading included). Untimed, per layer:
  its decision and its ΔW against the CLI's cold output (the figure GPU.md's baseline quotes).
* ``accuracy`` – a float64 reference per layer: the top-R bases from the float64 Gram matrix of each
  base weight (``eigh`` of ``WᵀW`` or ``WWᵀ``, the smaller side; for these spectra its error at the
  rank-R cut is ~1e-12, far below the float32 errors measured), the product's decision rule
  (:func:`lorax_core.similarity.layer_similarity`) on them and the ``exact`` transfer of the dense
  ΔW (:func:`benchmarks.perf.naive.exact_dense`, the product's ``auto`` choice for kohya LoRAs).
  Every output of the run is compared with it: relative Frobenius error of ΔW per layer, and the
  skip decisions (output present or not, and the status in the CLI's report). It checks at most
  ``accuracy_layers`` layers, evenly spread, and stops at its time limit (it says how many it did).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

from benchmarks.perf.generate import lora_name
from benchmarks.perf.naive import Bases, dense_delta, exact_dense, naive_transfer
from benchmarks.perf.worker import output_delta, read_layer
from lorax_core.linalg import Subspace
from lorax_core.similarity import layer_similarity, similarity_rank

__all__ = ["error_stats", "reference_subspace", "report_statuses", "run_accuracy", "run_naive", "spread"]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖_F / ‖want‖_F, computed in ``want``'s dtype on its device."""
    return float((got.to(want) - want).norm() / want.norm())


def error_stats(errors: dict[str, float]) -> dict[str, object]:
    """``{max, median, worst_layer, layers}`` of per-layer errors (``None`` figures when empty)."""
    if not errors:
        return {"max": None, "median": None, "worst_layer": None, "layers": 0}
    worst = max(errors, key=errors.__getitem__)
    return {
        "max": errors[worst],
        "median": statistics.median(errors.values()),
        "worst_layer": worst,
        "layers": len(errors),
    }


def report_statuses(path: Path) -> dict[str, str]:
    """``{layer name: status}`` of a transfer report (``--report`` of the CLI)."""
    return {r["key"]: r["status"] for r in json.loads(path.read_text())["layers"]}


def spread(items: list[str], limit: int) -> list[str]:
    """At most ``limit`` items, evenly spread over the list, first and last included (0: all)."""
    if limit <= 0 or len(items) <= limit:
        return list(items)
    if limit == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (limit - 1))] for i in range(limit)]


def _peak_vram_gb(device: str) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9


def run_naive(spec: dict[str, object]) -> dict[str, object]:
    """The naive recipe on LoRA A (timed), then per layer: its decision and its ΔW vs the CLI's cold output."""
    device = str(spec["device"])
    run = Path(str(spec["run"]))
    cold = Path(str(spec["outputs"]["cli_cold"]["path"]))  # type: ignore[index]
    cold_report = Path(str(spec["reports"]["cli_cold"]))  # type: ignore[index]
    decisions: dict[str, bool] = {}
    errors: dict[str, float] = {}

    def sink(key: str, name: str, result: torch.Tensor | None, bases: Bases) -> None:
        decisions[name] = result is not None
        got = output_delta(cold, name) if cold.exists() else None
        if result is not None and got is not None:
            errors[name] = rel_err(got.to(result.device), result)

    stats = naive_transfer(
        run / "source.safetensors",
        run / "target.safetensors",
        Path(str(spec["lora_a"])),
        rank=int(spec["rank"]),  # type: ignore[call-overload]
        threshold=float(spec["threshold"]),  # type: ignore[arg-type]
        sink=sink,
        device=device,
    )
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    statuses = report_statuses(cold_report) if cold_report.exists() else {}
    mismatches = sorted(n for n, ok in decisions.items() if n in statuses and ok != (statuses[n] == "transferred"))
    return {
        **stats,
        "process_cpu_s": cpu.ru_utime + cpu.ru_stime,
        "peak_vram_gb": _peak_vram_gb(device),
        "transferred": sum(decisions.values()),
        "cli_cold_vs_naive": error_stats(errors),
        "cli_cold_decision_mismatches": mismatches if statuses else None,
    }


def reference_subspace(weight: torch.Tensor, rank: int, device: str) -> Subspace:
    """Top-``rank`` singular triplets in float64: ``eigh`` of the float64 Gram matrix of the smaller side.

    The other side's vectors are ``W v / s`` (resp. ``Wᵀ u / s``), accurate for the top directions
    kept here. Signs are left as ``eigh`` returns them: every use below is sign-invariant.
    """
    w = weight.to(device=device, dtype=torch.float64)
    m, n = w.shape
    wide = m < n
    evals, evecs = torch.linalg.eigh(w @ w.T if wide else w.T @ w)
    top = evecs[:, -rank:].flip(-1)
    s = evals[-rank:].flip(0).clamp_min(0.0).sqrt()
    other = (w.T @ top if wide else w @ top) / s
    U, V = (top, other) if wide else (other, top)
    return Subspace(U=U, S=s, V=V)


def run_accuracy(spec: dict[str, object], time_limit: float) -> dict[str, object]:
    """Every output of the run vs the float64 reference, on at most ``accuracy_layers`` layers."""
    from safetensors.torch import load_file

    start = time.perf_counter()
    device = str(spec["device"])
    run = Path(str(spec["run"]))
    rank, threshold = int(spec["rank"]), float(spec["threshold"])  # type: ignore[call-overload, arg-type]
    outputs = {
        label: (Path(str(o["path"])), str(o["lora"]))
        for label, o in spec["outputs"].items()  # type: ignore[attr-defined]
        if Path(str(o["path"])).exists()
    }
    statuses = {
        label: report_statuses(Path(str(p)))
        for label, p in spec["reports"].items()  # type: ignore[attr-defined]
        if Path(str(p)).exists()
    }
    loras = {"a": load_file(str(spec["lora_a"])), "b": load_file(str(spec["lora_b"]))}
    keys = [str(k) for k in spec["keys"]]  # type: ignore[attr-defined]
    chosen = spread(keys, int(spec["accuracy_layers"]))  # type: ignore[call-overload]
    errors: dict[str, dict[str, float]] = {label: {} for label in outputs}
    mismatches: dict[str, list[str]] = {label: [] for label in outputs}
    status_mismatches: dict[str, list[str]] = {label: [] for label in statuses}
    passed = checked = 0
    for key in chosen:
        if time.perf_counter() - start > time_limit:
            break
        name = lora_name(key)
        ws = read_layer(run / "source.safetensors", [key])[key]
        wt = read_layer(run / "target.safetensors", [key])[key]
        m, n = ws.shape
        r = min(rank, m, n)
        src, tgt = reference_subspace(ws, r, device), reference_subspace(wt, r, device)
        verdict = layer_similarity(src, tgt, similarity_rank(r, m, n), threshold)
        bases = Bases(src.U, src.V, tgt.U, tgt.V, verdict.passed, verdict.phi or 0.0)
        passed += verdict.passed
        checked += 1
        wants = {
            tag: exact_dense(dense_delta(lora, name).to(device=device, dtype=torch.float64), bases)
            for tag, lora in loras.items()
            if verdict.passed
        }
        for label, (path, tag) in outputs.items():
            got = output_delta(path, name)
            if (got is None) == verdict.passed:
                mismatches[label].append(name)
            elif got is not None:
                errors[label][name] = rel_err(got.to(device), wants[tag])
        for label, table in statuses.items():
            if (table.get(name) == "transferred") != verdict.passed:
                status_mismatches[label].append(name)
    return {
        "reference": "float64: eigh of the float64 Gram matrix per base weight, the product's decision rule, "
        "exact transfer of the dense ΔW",
        "device": device,
        "layers_measured": len(keys),
        "layers_chosen": len(chosen),
        "layers_checked": checked,
        "reference_transferred": passed,
        "seconds": time.perf_counter() - start,
        "errors": {label: error_stats(errs) for label, errs in errors.items()},
        "decision_mismatches": mismatches,
        "report_status_mismatches": status_mismatches,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("naive", "accuracy"))
    p.add_argument("--spec", type=Path, required=True, help="the run's spec.json (written by run.py)")
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--time-limit", type=float, default=600.0, help="accuracy: stop checking layers after this")
    args = p.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    if torch.device(spec["device"]).type == "cuda":
        torch.zeros(1, device=spec["device"]).sum().item()  # the CUDA context, before any timer
    res = run_naive(spec) if args.mode == "naive" else run_accuracy(spec, args.time_limit)
    args.result.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
