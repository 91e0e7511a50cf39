"""One measured run, in its own process (so peak RSS is per run): ``naive``, ``lorax`` or ``scaling``.

Started by :mod:`benchmarks.perf.run`; each writes a JSON result file. Times cover the work
after imports (reading models and LoRA, transfer, writing the output); ``peak_rss_mb`` is the
process's high-water resident set (``getrusage(RUSAGE_SELF).ru_maxrss``), imports included.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from .naive import Bases, dense_delta, exact_dense, naive_transfer


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MiB (ru_maxrss is bytes on macOS, KiB on Linux)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0**2 if sys.platform == "darwin" else rss / 1024.0


def subset_keys(all_keys: list[str], stride: int, limit: int | None = None) -> list[str]:
    """Every ``stride``-th key of the sorted list (a deterministic, spread-out subset), at most ``limit``."""
    keys = sorted(all_keys)[::stride]
    return keys if limit is None else keys[:limit]


class TimedSource:
    """A WeightSource wrapper that adds up the time spent reading tensors."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.read_s = 0.0
        self.reads = 0

    @property
    def fingerprint(self) -> str:
        return self.inner.fingerprint  # type: ignore[attr-defined]

    @property
    def path(self) -> Path:
        return self.inner.path  # type: ignore[attr-defined]

    def keys(self) -> Iterator[str]:
        return self.inner.keys()  # type: ignore[attr-defined]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.inner.shape(key)  # type: ignore[attr-defined]

    def __contains__(self, key: object) -> bool:
        return key in self.inner  # type: ignore[operator]

    def get(self, key: str) -> torch.Tensor:
        t = time.perf_counter()
        out = self.inner.get(key)  # type: ignore[attr-defined]
        self.read_s += time.perf_counter() - t
        self.reads += 1
        return out


class TimedCache:
    """A SubspaceCache wrapper: time inside the cache, and inside ``compute`` (read + decomposition)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.total_s = 0.0
        self.compute_s = 0.0
        self.computed = 0

    def get_or_compute(self, fingerprint, key, rank, compute):  # type: ignore[no-untyped-def]
        def timed():  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            out = compute()
            self.compute_s += time.perf_counter() - t
            self.computed += 1
            return out

        t = time.perf_counter()
        out = self.inner.get_or_compute(fingerprint, key, rank, timed)  # type: ignore[attr-defined]
        self.total_s += time.perf_counter() - t
        return out


def run_lorax(
    source: Path,
    target: Path,
    lora_path: Path,
    out: Path,
    cache_dir: Path | None,
    keys: set[str] | None,
    device: str,
    rank: int = 320,
) -> dict[str, object]:
    """The product path, as the CLI runs it: open models lazily, read+resolve the LoRA, transfer, write."""
    from lorax_core.cache import DiskCache, NullCache
    from lorax_core.formats import read_lora, write_lora
    from lorax_core.modelio import open_model
    from lorax_core.pipeline import output_names, plan_transfer
    from lorax_core.transfer import transfer_adapter
    from lorax_core.types import TransferOptions

    t0 = time.perf_counter()
    src_model, tgt_model = open_model(source), open_model(target)
    src, tgt = TimedSource(src_model), TimedSource(tgt_model)
    lora = read_lora(lora_path)
    plan = plan_transfer(lora, src_model)
    if keys is not None:
        plan.layers = {k: v for k, v in plan.layers.items() if k in keys}
    t1 = time.perf_counter()
    cache = TimedCache(DiskCache(cache_dir) if cache_dir is not None else NullCache())
    result = transfer_adapter(
        plan.layers, src, tgt, TransferOptions(rank=rank, device=device), names=plan.names, skipped=plan.skipped,
        cache=cache,
    )
    t2 = time.perf_counter()
    names = output_names(result, plan, lora.format)
    write_lora(out, {names[k]: f for k, f in result.layers.items()}, style=lora, overwrite=True)
    t3 = time.perf_counter()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    totals = result.report.totals()
    inner = cache.inner
    stats = getattr(inner, "stats", None)
    read_in_compute = src.read_s + tgt.read_s
    return {
        "seconds": t3 - t0,
        "process_cpu_s": cpu.ru_utime + cpu.ru_stime,
        "layers": len(plan.layers),
        "transferred": totals["transferred"],
        "skipped": totals["skipped"],
        "skipped_by_reason": totals["skipped_by_reason"],
        "phases_s": {
            "open_and_read_lora": t1 - t0,
            "transfer_adapter": t2 - t1,
            "read_base_weights": read_in_compute,
            "decompose": max(0.0, cache.compute_s - read_in_compute),
            "cache_io": cache.total_s - cache.compute_s,
            "transfer_maths_and_similarity": (t2 - t1) - cache.total_s,
            "write_output": t3 - t2,
        },
        "weights_read": src.reads + tgt.reads,
        "subspaces_computed": cache.computed,
        "cache_stats": None if stats is None else vars(stats),
        "peak_rss_mb": peak_rss_mb(),
    }


def read_layer(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Read some tensors of a safetensors file with plain reads (no memory map, so no lingering RSS)."""
    with path.open("rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
        out = {}
        dtypes = {"F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16}
        for name in names:
            if name not in header:
                continue
            entry = header[name]
            start, end = entry["data_offsets"]
            fh.seek(8 + n + start)
            buf = bytearray(fh.read(end - start))
            out[name] = torch.frombuffer(buf, dtype=dtypes[entry["dtype"]]).reshape(entry["shape"]).clone()
        return out


def output_delta(path: Path, name: str) -> torch.Tensor | None:
    t = read_layer(path, [f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha"])
    if f"{name}.lora_up.weight" not in t:
        return None
    return dense_delta(t, name)


def run_naive(
    source: Path,
    target: Path,
    lora_a: Path,
    lora_b: Path,
    out_a: Path | None,
    out_b: Path | None,
    keys: set[str] | None,
    rank: int = 320,
) -> dict[str, object]:
    """Naive transfer of LoRA A (timed); untimed, per layer: compare with the product's outputs.

    The product's LoRA B output (the warm run) is checked against the naive result for LoRA B
    computed with the same naive bases, so one set of SVDs serves both comparisons.
    """
    from safetensors.torch import load_file

    lora_b_tensors = load_file(str(lora_b)) if out_b is not None else {}
    errors: dict[str, list[float]] = {"cold": [], "warm": []}
    mismatched: dict[str, list[str]] = {"cold": [], "warm": []}
    peak_before_check = 0.0

    def compare(label: str, out: Path, name: str, want: torch.Tensor | None) -> None:
        got = output_delta(out, name)
        if (got is None) != (want is None):
            mismatched[label].append(name)
        elif want is not None and got is not None:
            errors[label].append(float((got - want).norm() / want.norm()))

    def sink(key: str, name: str, result: torch.Tensor | None, bases: Bases) -> None:
        nonlocal peak_before_check
        peak_before_check = max(peak_before_check, peak_rss_mb())
        if out_a is not None:
            compare("cold", out_a, name, result)
        if out_b is not None:
            want_b = exact_dense(dense_delta(lora_b_tensors, name), bases) if bases.passed else None
            compare("warm", out_b, name, want_b)

    stats = naive_transfer(source, target, lora_a, rank=rank, keys=keys, sink=sink)
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    return {
        **stats,
        "process_cpu_s": cpu.ru_utime + cpu.ru_stime,
        # The high-water mark while the naive maths ran; the comparison adds a few MB at most.
        "peak_rss_mb": max(peak_before_check, 0.0) or peak_rss_mb(),
        "max_rel_err": {k: max(v) if v else None for k, v in errors.items()},
        "mean_rel_err": {k: sum(v) / len(v) if v else None for k, v in errors.items()},
        "compared_layers": {k: len(v) for k, v in errors.items()},
        "decision_mismatches": mismatched,
    }


def run_scaling(family_dir: Path, work: Path, device: str, rank: int = 320) -> dict[str, object]:
    """Cold (empty cache) and warm time vs number of LoRA layers (2, 4, 8; rank 32) and vs LoRA rank (4 layers)."""
    from lorax_core.formats import read_lora
    from lorax_core.modelio import open_model
    from lorax_core.pipeline import plan_transfer

    source, target = family_dir / "source.safetensors", family_dir / "target.safetensors"
    lora_a = read_lora(family_dir / "lora_a.safetensors")
    all_keys = sorted(plan_transfer(lora_a, open_model(source)).layers)
    rows: list[dict[str, object]] = []

    def measure(n_layers: int, rank: int, cold_lora: Path, warm_lora: Path) -> None:
        stride = max(1, len(all_keys) // n_layers)
        keys = set(subset_keys(all_keys, stride, n_layers))
        cache_dir = work / "scaling-cache"
        shutil.rmtree(cache_dir, ignore_errors=True)
        out = work / "scaling-out.safetensors"
        cold = run_lorax(source, target, cold_lora, out, cache_dir, keys, device, rank)
        warm = run_lorax(source, target, warm_lora, out, cache_dir, keys, device, rank)
        rows.append(
            {
                "layers": len(keys),
                "lora_rank": rank,
                "cold_s": cold["seconds"],
                "warm_s": warm["seconds"],
                "cold_decompose_s": cold["phases_s"]["decompose"],  # type: ignore[index]
                "warm_cache_io_s": warm["phases_s"]["cache_io"],  # type: ignore[index]
            }
        )
        shutil.rmtree(cache_dir, ignore_errors=True)

    # Small sizes on purpose: the whole table must fit next to the main runs on a shared 2-core machine.
    for n in (2, 4, 8):
        measure(n, 32, family_dir / "lora_a.safetensors", family_dir / "lora_b.safetensors")
    for rank in (8, 128):
        lora = family_dir / f"lora_r{rank}.safetensors"
        measure(4, rank, lora, lora)
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("mode", choices=("naive", "lorax", "scaling"))
    p.add_argument("--family-dir", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--lora", default="lora_a")
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--compare-a", type=Path, default=None)
    p.add_argument("--compare-b", type=Path, default=None)
    p.add_argument("--keys", type=Path, default=None, help="JSON list of model tensor names (subset runs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rank", type=int, default=320, help="subspace rank R")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keys = set(json.loads(args.keys.read_text())) if args.keys else None
    fam = args.family_dir
    if args.mode == "naive":
        res = run_naive(
            fam / "source.safetensors",
            fam / "target.safetensors",
            fam / "lora_a.safetensors",
            fam / "lora_b.safetensors",
            args.compare_a,
            args.compare_b,
            None if keys is None else {k[len("diffusion_model.") :] for k in keys},
            args.rank,
        )
    elif args.mode == "lorax":
        res = run_lorax(
            fam / "source.safetensors",
            fam / "target.safetensors",
            fam / f"{args.lora}.safetensors",
            args.out,
            args.cache,
            keys,
            args.device,
            args.rank,
        )
    else:
        res = run_scaling(fam, args.work, args.device, args.rank)
    args.result.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
