"""The subspace supply: each base weight's top-R singular subspace, computed once per run.

:class:`SubspaceProvider` hands a layer's :class:`~lorax_core.linalg.Subspace` to the
similarity pass (:mod:`lorax_core.similarity`), the transfer (:mod:`lorax_core.transfer`), the
layer matching and the LoRA-X base check, through the subspace cache (:mod:`lorax_core.cache`)
or a per-run dict, so a similarity pass and the transfer that follows share their
decompositions. On CUDA it decomposes same-shape layers in batches
(:mod:`lorax_core.batched`); :func:`prefetched_chunks` walks a caller's layers in chunks whose
subspaces are prefetched before use and released after, which bounds the device memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from typing import TYPE_CHECKING, TypeVar

import torch

from .batched import BATCHED_VERSION, BatchStats, batch_capacity, read_ahead, top_subspaces_batched
from .cache import NullCache, WritableSubspaceCache
from .errors import NonFiniteError, OptionError, RankError
from .linalg import Subspace, top_subspace
from .types import WeightSource, flat_shape

if TYPE_CHECKING:
    from .cache import SubspaceCache

__all__ = ["CHUNK_SUBSPACE_BYTES", "SubspaceProvider", "prefetched_chunks"]

_Item = TypeVar("_Item")


class SubspaceProvider:
    """Computes each weight's top-R subspace once, through a cache or a per-call dict.

    ``cache`` is any object with ``get_or_compute(fingerprint, key, rank, compute) -> Subspace``
    (``lorax_core.cache``); without one, a plain dict lives as long as this provider, so a
    similarity pass and the transfer that follows share the decompositions.

    *Batched mode* (the CUDA path, ``docs/CORE.md``): :meth:`prefetch` decomposes many layers
    at once with :func:`lorax_core.batched.top_subspaces_batched` (float32, checked per layer,
    falling back to :func:`top_subspace`), and :meth:`get` decomposes a layer it was not given
    the same way, alone. Its cache entries carry the tag
    :data:`lorax_core.batched.BATCHED_VERSION`, so a batched run never reads ``top_subspace``'s
    entries and a CPU run never reads batched ones. Prefetched subspaces are kept, exact and on
    the device, in this provider's dict until :meth:`release` (callers prefetch and release in
    chunks, which bounds the device memory), and handed to the cache for later runs.

    Args:
        cache: see above; batched mode needs ``None`` or a
            :class:`~lorax_core.cache.WritableSubspaceCache` (every cache of ``lorax_core.cache``).
        device: where decompositions run and results are returned.
        batched: ``None`` (default): batched exactly when ``device`` is CUDA and the cache
            allows it, so CPU runs keep the one-layer path and its numbers. ``True``/``False``
            force it (``True`` on the CPU is for tests and measurements).

    Raises:
        OptionError: ``batched=True`` with a cache that cannot take precomputed entries.
    """

    def __init__(
        self, cache: SubspaceCache | None = None, device: torch.device | str = "cpu", batched: bool | None = None
    ) -> None:
        writable = cache is None or isinstance(cache, WritableSubspaceCache)
        if batched and not writable:
            raise OptionError(
                f"batched decomposition needs a cache with lookup/contains/put/flush ({type(cache).__name__} has "
                "only get_or_compute); use a lorax_core.cache cache, no cache, or batched=False."
            )
        self._cache = cache
        self._device = device
        self._local: dict[tuple[str, str, int], Subspace | NonFiniteError] = {}
        self._prefetched: set[tuple[str, str, int]] = set()
        self.batched: bool = (writable and torch.device(device).type == "cuda") if batched is None else batched
        #: Layers, batches and fallbacks of the batched path (all zero when not batched).
        self.batch_stats = BatchStats()
        # Where batched results go: the cache, unless it keeps nothing (then this provider's dict).
        self._keeper = cache if isinstance(cache, WritableSubspaceCache) and not isinstance(cache, NullCache) else None

    def get(self, weights: WeightSource, key: str, rank: int) -> Subspace:
        """Top-``rank`` subspace of ``weights.get(key)`` (rank already clipped to the layer), on the device.

        Raises:
            NonFiniteError: the weight holds NaN or Inf (also when :meth:`prefetch` found so).
        """
        fingerprint = weights.fingerprint
        ident = (fingerprint, key, rank)
        held = self._local.get(ident)
        if isinstance(held, NonFiniteError):
            raise held.with_traceback(None)  # the same error each time, without past tracebacks
        if held is not None:
            return held
        if self.batched:
            return self._get_batched(weights, key, rank)

        def compute() -> Subspace:
            return top_subspace(weights.get(key), rank, device=self._device)

        if self._cache is not None:
            return self._cache.get_or_compute(fingerprint, key, rank, compute).to(self._device)
        self._local[ident] = sub = compute()
        return sub

    def prefetch(self, weights: WeightSource, requests: Iterable[tuple[str, int]]) -> None:
        """Make many subspaces ready ahead of :meth:`get`, batched by shape and rank; batched mode only.

        ``requests`` are ``(model key, rank)`` pairs as :meth:`get` will receive them (ranks
        clipped to the layer). Each one ends up in this provider's dict on the device, until
        :meth:`release`:

        * already there: nothing to do;
        * in the cache under the batched tag: read from it;
        * else decomposed, grouped by (flattened shape, rank), in batches of
          :func:`lorax_core.batched.batch_capacity` layers, and handed to the cache
          (``put``; a :class:`~lorax_core.cache.DiskCache` encodes and writes on its own
          thread, so the exact float32 result is used now and the file serves later runs).

        One background thread reads the next job's weights (or cache entries) while the device
        works on the current one, so at most three batches of weights (stored dtype) are in
        host memory. A weight holding NaN/Inf is remembered: :meth:`get` raises its
        :class:`NonFiniteError`. A key that is unknown, not 2-D/4-D or unreadable is left out,
        for :meth:`get` to fail on in the caller's context. Without batched mode this does
        nothing.

        Raises:
            RankError: a rank < 1.
        """
        if not self.batched:
            return
        fingerprint = weights.fingerprint
        cached: list[tuple[str, int]] = []
        groups: dict[tuple[int, int, int], list[str]] = {}
        for key, rank in dict.fromkeys(requests):
            if not isinstance(rank, int) or rank < 1:
                raise RankError(f"subspace rank must be a positive integer (the paper uses 320); got {rank!r}.")
            if (fingerprint, key, rank) in self._local:
                continue
            if self._keeper is not None and self._keeper.contains(fingerprint, key, rank, method=BATCHED_VERSION):
                cached.append((key, rank))
                continue
            try:
                shape = tuple(weights.shape(key))
            except Exception:  # an unknown key: get() raises it where the caller handles it
                continue
            if len(shape) in (2, 4):
                groups.setdefault((*flat_shape(shape), rank), []).append(key)
        # Cache reads first (cheap), then the decompositions; the reader thread overlaps both.
        jobs: list[tuple[bool, int, list[str]]] = [(True, rank, [key]) for key, rank in cached]
        for (m, n, rank), keys in groups.items():
            step = batch_capacity((m, n), rank)
            jobs.extend((False, rank, keys[i : i + step]) for i in range(0, len(keys), step))

        def read(job: tuple[bool, int, list[str]]) -> tuple[bool, int, dict[str, object]]:
            from_cache, rank, keys = job
            loaded: dict[str, object] = {}
            for key in keys:
                try:
                    if from_cache:
                        found = self._keeper.lookup(fingerprint, key, rank, method=BATCHED_VERSION)  # type: ignore[union-attr]
                        if found is not None:  # evicted meanwhile: get() recomputes it
                            loaded[key] = found
                    else:
                        loaded[key] = weights.get(key)
                except NonFiniteError as exc:  # a source that checks on reading (SafetensorsWeights)
                    loaded[key] = exc
                except Exception:  # left for get() to raise in the caller's context
                    continue
            return from_cache, rank, loaded

        with closing(read_ahead(jobs, read)) as results:
            for from_cache, rank, loaded in results:
                if from_cache:
                    for key, sub in loaded.items():
                        self._keep((fingerprint, key, rank), sub.to(self._device) if isinstance(sub, Subspace) else sub)
                else:
                    self._decompose_batch(fingerprint, rank, loaded)

    def release(self) -> None:
        """Forget what :meth:`prefetch` made ready (frees its device memory; the cache keeps its copies)."""
        for ident in self._prefetched:
            self._local.pop(ident, None)
        self._prefetched.clear()

    def flush(self) -> None:
        """Wait until the cache has written every entry handed to it (no-op without a cache)."""
        if self._keeper is not None:
            self._keeper.flush()

    def _keep(self, ident: tuple[str, str, int], outcome: object) -> None:
        self._local[ident] = outcome  # type: ignore[assignment]
        self._prefetched.add(ident)

    def _get_batched(self, weights: WeightSource, key: str, rank: int) -> Subspace:
        def compute() -> Subspace:
            (result,) = top_subspaces_batched([weights.get(key)], rank, device=self._device, stats=self.batch_stats)
            if isinstance(result, NonFiniteError):
                raise result
            return result

        if self._keeper is not None:
            found = self._keeper.get_or_compute(weights.fingerprint, key, rank, compute, method=BATCHED_VERSION)
            return found.to(self._device)
        self._local[(weights.fingerprint, key, rank)] = sub = compute()
        return sub

    def _decompose_batch(self, fingerprint: str, rank: int, loaded: dict[str, object]) -> None:
        """Decompose one batch of read weights; keep every outcome here and hand results to the cache."""
        tensors = {key: w for key, w in loaded.items() if isinstance(w, torch.Tensor)}
        outcomes: dict[str, object] = {key: w for key, w in loaded.items() if isinstance(w, NonFiniteError)}
        results = top_subspaces_batched(list(tensors.values()), rank, device=self._device, stats=self.batch_stats)
        outcomes.update(zip(tensors, results, strict=True))
        for key, result in outcomes.items():
            self._keep((fingerprint, key, rank), result)
            if self._keeper is not None and isinstance(result, Subspace):
                self._keeper.put(fingerprint, key, rank, result, method=BATCHED_VERSION)


#: Device memory the prefetched subspaces of one chunk may take (batched mode): with the batch
#: working set (``batched.DEFAULT_MAX_BATCH_BYTES``) well under the 2 GB a transfer may add
#: beside the models ComfyUI holds.
CHUNK_SUBSPACE_BYTES = 768 * 1024**2


def prefetched_chunks(
    provider: SubspaceProvider,
    source: WeightSource,
    target: WeightSource,
    items: Sequence[_Item],
    request: Callable[[_Item], tuple[str, str, int] | None],
) -> Iterator[list[_Item]]:
    """``items`` in order and in chunks, each chunk's subspaces made ready before it is yielded.

    Without batched mode: one chunk, nothing prefetched (``request`` is never called). In
    batched mode ``request(item)`` names the ``(source key, target key, rank)`` subspaces an
    item will ask ``provider.get`` for (``None``: none); chunks are cut so their float32
    subspaces fit :data:`CHUNK_SUBSPACE_BYTES`, each is prefetched from both models before it
    is yielded and released when the caller moves on, which bounds the device memory.
    """
    if not provider.batched:
        yield list(items)
        return
    chunk: list[tuple[_Item, tuple[str, str, int] | None]] = []
    size = 0
    for item in items:
        wanted = request(item)
        need = 0
        if wanted is not None:
            m, n = flat_shape(source.shape(wanted[0]))
            need = 2 * 4 * (m + n + 1) * wanted[2]  # source and target U, S, V in float32
        if chunk and size + need > CHUNK_SUBSPACE_BYTES:
            yield from _prefetched(provider, source, target, chunk)
            chunk, size = [], 0
        chunk.append((item, wanted))
        size += need
    if chunk:
        yield from _prefetched(provider, source, target, chunk)


def _prefetched(
    provider: SubspaceProvider,
    source: WeightSource,
    target: WeightSource,
    chunk: list[tuple[_Item, tuple[str, str, int] | None]],
) -> Iterator[list[_Item]]:
    """One chunk of :func:`prefetched_chunks`: prefetch, yield, release."""
    wanted = [w for _, w in chunk if w is not None]
    provider.prefetch(source, [(skey, rank) for skey, _, rank in wanted])
    provider.prefetch(target, [(tkey, rank) for _, tkey, rank in wanted])
    try:
        yield [item for item, _ in chunk]
    finally:
        provider.release()
