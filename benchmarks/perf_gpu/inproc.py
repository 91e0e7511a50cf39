"""The in-process step of :mod:`benchmarks.perf_gpu.run`: the CLI's transfer pipeline in one process, timed by stage.

    python -m benchmarks.perf_gpu.inproc --spec RUN/spec.json --lora a|b --cache DIR --out OUT --result R.json

It makes the public calls ``python -m lorax_core transfer`` makes (``lorax_core/cli.py``): ``open_model``,
``read_lora``, the ``DiskCache`` of ``open_cache``, the one transfer entry point
``lorax_core.pipeline.run_transfer`` and ``write_lora``, after creating the CUDA context (as a
ComfyUI process has it). The stages come from timing subclasses of the cache
(:class:`~lorax_core.cache.DiskCache`) and of the subspace provider
(:class:`~lorax_core.subspaces.SubspaceProvider`, handed to ``transfer_adapter``) and from
:class:`benchmarks.perf.worker.TimedSource` around each model, as in :mod:`benchmarks.perf.worker`,
whose ``TimedCache`` is not a writable cache and so would turn the batched CUDA path off:

* ``open_and_read_lora`` (with the plan), ``check_source_bases``, ``write_output`` (with names and
  metadata): wall time of those calls and steps (``TransferJob.seconds``); the base check reads
  through the timed models (a standard LoRA's check reads nothing);
* ``subspaces``: inside the provider (``prefetch`` and ``get``) on the main thread, of which
  ``read_base_weights`` and ``cache_io`` are the main thread's reads and cache calls (a cache call
  excludes the decomposition it triggers) and ``decompose`` the rest: the decompositions, and in the
  batched path the waits for the reader thread;
* ``flush``: waiting for the cache's background writes; ``transfer_maths_and_similarity``: the
  rest of ``transfer_adapter``;
* ``reads_all_threads_s``/``cache_io_all_threads_s``: the same sums over every thread (reads and
  cache look-ups overlap the GPU work in the batched path).
"""

from __future__ import annotations

import argparse
import json
import resource
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.perf.worker import TimedSource, peak_rss_mb
from lorax_core.cache import DiskCache
from lorax_core.linalg import Subspace
from lorax_core.subspaces import SubspaceProvider

__all__ = ["Clock", "run_inproc"]


class Clock:
    """Seconds spent in timed calls, in total and on the main thread; a call inside a timed call
    of the same clock (``DiskCache.get_or_compute`` calling ``lookup``) is not counted twice."""

    def __init__(self) -> None:
        self.total = 0.0
        self.main = 0.0
        self._depth = threading.local()

    @contextmanager
    def span(self) -> Iterator[list[float]]:
        """Time the block; add seconds to the yielded ``[excluded]`` to leave them out."""
        excluded = [0.0]
        depth = getattr(self._depth, "n", 0)
        self._depth.n = depth + 1
        t = time.perf_counter()
        try:
            yield excluded
        finally:
            self._depth.n = depth
            if depth == 0:
                seconds = time.perf_counter() - t - excluded[0]
                self.total += seconds
                if threading.current_thread() is threading.main_thread():
                    self.main += seconds

    def time(self, fn: Callable[[], object]) -> object:
        with self.span():
            return fn()


class _Source(TimedSource):
    """:class:`TimedSource` that also keeps the main thread's share and passes other attributes through."""

    def __init__(self, inner: object) -> None:
        super().__init__(inner)
        self.clock = Clock()

    def get(self, key: str) -> torch.Tensor:
        return self.clock.time(lambda: super(_Source, self).get(key))  # type: ignore[return-value]

    def __getattr__(self, name: str) -> object:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class _Cache(DiskCache):
    """A :class:`DiskCache` that times its calls (excluding the ``compute`` callbacks it runs)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.clock = Clock()
        self.computed = 0

    def get_or_compute(
        self, fingerprint: str, key: str, rank: int, compute: Callable[[], Subspace], *, method: str | None = None
    ) -> Subspace:
        with self.clock.span() as excluded:

            def timed() -> Subspace:
                t = time.perf_counter()
                try:
                    return compute()
                finally:
                    excluded[0] += time.perf_counter() - t
                    self.computed += 1

            return super().get_or_compute(fingerprint, key, rank, timed, method=method)

    def lookup(self, fingerprint: str, key: str, rank: int, *, method: str | None = None) -> Subspace | None:
        return self.clock.time(lambda: super(_Cache, self).lookup(fingerprint, key, rank, method=method))  # type: ignore[return-value]

    def contains(self, fingerprint: str, key: str, rank: int, *, method: str | None = None) -> bool:
        return self.clock.time(lambda: super(_Cache, self).contains(fingerprint, key, rank, method=method))  # type: ignore[return-value]

    def put(self, fingerprint: str, key: str, rank: int, sub: Subspace, *, method: str | None = None) -> None:
        self.clock.time(lambda: super(_Cache, self).put(fingerprint, key, rank, sub, method=method))


class _Provider(SubspaceProvider):
    """A :class:`SubspaceProvider` that times ``prefetch``/``get`` and ``flush``."""

    def __init__(self, cache: _Cache, device: str) -> None:
        super().__init__(cache, device)
        self.subspaces = Clock()
        self.flushing = Clock()

    def get(self, weights: object, key: str, rank: int) -> Subspace:
        return self.subspaces.time(lambda: super(_Provider, self).get(weights, key, rank))  # type: ignore[arg-type, return-value]

    def prefetch(self, weights: object, requests: Iterable[tuple[str, int]]) -> None:
        self.subspaces.time(lambda: super(_Provider, self).prefetch(weights, requests))  # type: ignore[arg-type]

    def flush(self) -> None:
        self.flushing.time(super().flush)


def run_inproc(spec: dict[str, object], lora_path: Path, cache_dir: Path, out: Path) -> dict[str, object]:
    """One transfer as the CLI runs it, in this process; seconds by stage and counters."""
    from lorax_core.formats import read_lora, write_lora
    from lorax_core.modelio import open_model
    from lorax_core.pipeline import file_model_info, run_transfer
    from lorax_core.types import TransferOptions

    device = str(spec["device"])
    run = Path(str(spec["run"]))
    options = TransferOptions(rank=int(spec["rank"]), threshold=float(spec["threshold"]), device=device)  # type: ignore[call-overload, arg-type]
    t0 = time.perf_counter()
    source, target = open_model(run / "source.safetensors"), open_model(run / "target.safetensors")
    lora = read_lora(lora_path)
    cache = _Cache(cache_dir)
    provider = _Provider(cache, device)
    src, tgt = _Source(source), _Source(target)
    t1 = time.perf_counter()
    job = run_transfer(
        lora, src, tgt, options, lora_name=lora_path.name, source_info=file_model_info(source),
        target_info=file_model_info(target), host="command line", source_name=str(source.path), cache=cache,
        provider=provider,
    )  # fmt: skip
    t3 = time.perf_counter()
    write_lora(out, job.out_layers, style=lora, metadata=job.metadata, overwrite=True)
    t4 = time.perf_counter()
    result, steps = job.result, job.seconds
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    reads_main = src.clock.main + tgt.clock.main
    subspaces = provider.subspaces.main
    flush = provider.flushing.main
    totals = result.report.totals()
    batch = vars(provider.batch_stats)
    return {
        "seconds": t4 - t0,
        "process_cpu_s": cpu.ru_utime + cpu.ru_stime,
        "layers": totals["layers"],
        "transferred": totals["transferred"],
        "skipped": totals["skipped"],
        "skipped_by_reason": totals["skipped_by_reason"],
        "phases_s": {
            "open_and_read_lora": t1 - t0 + steps["plan"],
            "check_source_bases": steps["check_bases"],
            "subspaces": subspaces,
            "read_base_weights": reads_main,
            "cache_io": cache.clock.main,
            "decompose": max(0.0, subspaces - reads_main - cache.clock.main),
            "flush": flush,
            "transfer_maths_and_similarity": max(0.0, steps["transfer"] - subspaces - flush),
            "write_output": t4 - t3 + steps["finish"],
        },
        "reads_all_threads_s": src.clock.total + tgt.clock.total,
        "cache_io_all_threads_s": cache.clock.total,
        "batched": provider.batched,
        "batch_stats": batch,
        "weights_read": src.reads + tgt.reads,
        "subspaces_computed": cache.computed + batch["layers"],
        "cache_stats": vars(cache.stats),
        "peak_rss_mb": peak_rss_mb(),
        "peak_vram_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.device(device).type == "cuda" else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spec", type=Path, required=True, help="the run's spec.json (written by run.py)")
    p.add_argument("--lora", choices=("a", "b"), required=True)
    p.add_argument("--cache", type=Path, required=True, help="the subspace cache folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True)
    args = p.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    if torch.device(spec["device"]).type == "cuda":
        torch.zeros(1, device=spec["device"]).sum().item()  # the CUDA context, before any timer
    res = run_inproc(spec, Path(spec[f"lora_{args.lora}"]), args.cache, args.out)
    args.result.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
