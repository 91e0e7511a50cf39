"""Subspace similarity between a source and a target layer, and the rules that make it a verdict.

Φ (LoRA-X, arXiv 2501.16559, Eq. 4; the projection overlap of the LoRA paper, arXiv 2106.09685)
compares the top-k singular subspaces of two same-shape weights:

    Φ_left = ‖U_sᵀ U_t‖²_F / k,   Φ_right = ‖V_sᵀ V_t‖²_F / k,   Φ = min(Φ_left, Φ_right).

Φ ∈ [0, 1]; 1 means the same subspace. Two random k-dimensional subspaces of R^dim score
k / dim on average (the *chance level*), so a raw number means nothing without it. Three
rules turn Φ into a decision (all measured; numbers in ``docs/CORE.md``):

* :func:`similarity_rank` – decide with k ≤ min(out, in)/4, so that chance stays ≤ 0.25 and
  Φ stays informative even where the transfer rank R covers the whole layer (SD's 320-wide
  layers at R = 320 have complete bases: Φ ≡ 1 and chance = 1 there).
* :func:`chance_level` – k / dim, per side; the combined verdict uses the larger of the two.
* :func:`threshold_for` – τ = chance + c·(1 − chance): c is the fraction of the way from
  chance to identical subspaces, so the same c means the same thing at every layer width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch

from .batched import BATCHED_VERSION, BatchStats, batch_capacity, read_ahead, top_subspaces_batched
from .cache import NullCache, WritableSubspaceCache
from .errors import NonFiniteError, OptionError, RankError
from .linalg import Subspace, top_subspace
from .types import WeightSource, flat_shape

_Item = TypeVar("_Item")

if TYPE_CHECKING:
    from .cache import SubspaceCache

__all__ = [
    "LayerSimilarity",
    "SimilarityTable",
    "SubspaceProvider",
    "chance_level",
    "compute_similarity",
    "layer_similarity",
    "phi",
    "similarity_rank",
    "threshold_for",
]

#: Decide with at most min(out, in) // SIMILARITY_DIVISOR directions (see :func:`similarity_rank`).
SIMILARITY_DIVISOR = 4


def similarity_rank(rank: int, out_dim: int, in_dim: int) -> int:
    """The rank k used to *decide* whether a layer transfers.

    ``k = max(1, min(R, out, in, min(out, in) // 4))``. When R is well below the layer's
    dimensions this is R itself (1280-wide SD layers at R = 320); otherwise it is a quarter of
    the smaller side, which keeps the chance level at ≤ 0.25 (320-wide layers: k = 80). With
    k = min(out, in) the bases are complete, every pair scores Φ = 1 and the test cannot reject
    anything; the measurements in ``docs/CORE.md`` show the separation between related and
    unrelated layers is largest around k = d/8…d/4 on decaying spectra.

    Raises:
        RankError: a non-positive rank or dimension.
    """
    if rank < 1 or out_dim < 1 or in_dim < 1:
        raise RankError(
            f"similarity rank needs positive sizes; got rank={rank}, out={out_dim}, in={in_dim}. "
            "Use rank >= 1 on a non-empty layer."
        )
    d = min(out_dim, in_dim)
    return max(1, min(rank, d, d // SIMILARITY_DIVISOR))


def chance_level(k: int, dim: int) -> float:
    """Expected Φ of two independent uniformly random k-dimensional subspaces of R^dim: k / dim."""
    if dim < 1 or k < 0:
        raise RankError(f"chance level needs 0 <= k and dim >= 1; got k={k}, dim={dim}.")
    return min(1.0, k / dim)


def phi(Ua: torch.Tensor, Ub: torch.Tensor) -> float:
    """Subspace overlap ``‖Uaᵀ Ub‖²_F / k`` of two orthonormal bases.

    Args:
        Ua: ``(d, k)`` orthonormal columns; Ub: ``(d, k')`` orthonormal columns, same ``d``.
            Normalised by ``k = min(k, k')`` so the result is in [0, 1]. Any float dtype/device
            (computed in float32 on ``Ua``'s device).

    Returns:
        1.0 for the same subspace (any basis, any signs), ≈ k/d for unrelated random subspaces.
    """
    if Ua.shape[0] != Ub.shape[0]:
        raise RankError(f"cannot compare subspaces of R^{Ua.shape[0]} and R^{Ub.shape[0]}; the layers' widths differ.")
    k = min(Ua.shape[1], Ub.shape[1])
    if k == 0:
        return 0.0
    overlap = Ua.to(torch.float32).T @ Ub.to(device=Ua.device, dtype=torch.float32)
    return min(1.0, float(overlap.pow(2).sum()) / k)


def threshold_for(chance: float, c: float) -> float:
    """τ = chance + c·(1 − chance): the Φ a layer must reach, for a c in [0, 1].

    c = 0 accepts anything at chance level, c = 1 only identical subspaces; the default
    c = 0.5 sits halfway, which measured fine-tuned/noisy relatives clear by a wide margin
    (normalised Φ ≥ 0.9) while unrelated/rotated layers stay near 0 (``docs/CORE.md``).
    ProLoRA's absolute 0.8 at chance 0.25 corresponds to c ≈ 0.73.

    Raises:
        OptionError: c outside [0, 1].
    """
    if not 0.0 <= float(c) <= 1.0:
        raise OptionError(f"threshold c must be in [0, 1] (0 = chance level, 1 = identical subspaces); got {c!r}.")
    return chance + c * (1.0 - chance)


@dataclass
class LayerSimilarity:
    """Φ of one (source layer, target layer) pair at the decision rank.

    ``phi_left``/``phi_right`` are ``None`` (and ``passed`` False) when the pair could not be
    compared; ``reason`` then says why (e.g. the widths differ).
    """

    source_key: str
    target_key: str
    phi_left: float | None
    phi_right: float | None
    chance: float | None
    rank: int | None
    threshold: float | None
    passed: bool
    reason: str = ""

    @property
    def phi(self) -> float | None:
        """The combined verdict value min(Φ_left, Φ_right)."""
        if self.phi_left is None or self.phi_right is None:
            return None
        return min(self.phi_left, self.phi_right)


@dataclass
class SimilarityTable:
    """All compared pairs, in the order they were given."""

    entries: list[LayerSimilarity] = field(default_factory=list)

    def get(self, source_key: str) -> LayerSimilarity | None:
        """The entry for a source model key (the first, if there are several), or ``None``."""
        for entry in self.entries:
            if entry.source_key == source_key:
                return entry
        return None

    def to_dict(self) -> dict[str, object]:
        return {
            "passed": sum(e.passed for e in self.entries),
            "pairs": len(self.entries),
            "entries": [asdict(e) for e in self.entries],
        }

    def summary(self, max_rows: int = 12) -> str:
        """Counts plus the least similar pairs, one line each."""
        passed = sum(e.passed for e in self.entries)
        lines = [f"subspace similarity: {passed} of {len(self.entries)} layer pairs pass the threshold."]
        ranked = sorted(self.entries, key=lambda e: -1.0 if e.phi is None else e.phi)
        for e in ranked[:max_rows]:
            if e.phi is None:
                lines.append(f"  {e.source_key} -> {e.target_key}: not compared ({e.reason})")
            else:
                lines.append(
                    f"  {e.source_key} -> {e.target_key}: Φ={e.phi:.3f} (left {e.phi_left:.3f}, right "
                    f"{e.phi_right:.3f}; chance {e.chance:.3f}, threshold {e.threshold:.3f}, k={e.rank})"
                )
        return "\n".join(lines)


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


def layer_similarity(
    src: Subspace, tgt: Subspace, k: int, c: float, *, source_key: str = "", target_key: str = ""
) -> LayerSimilarity:
    """Φ_left, Φ_right, chance and verdict of two same-shape layers at decision rank ``k``.

    ``src``/``tgt`` must hold at least ``k`` directions (truncated here). Chance is the larger
    of the two sides' ``k/dim``.
    """
    m, n = src.shape
    s, t = src.truncate(k), tgt.truncate(k)
    phi_left, phi_right = phi(s.U, t.U), phi(s.V, t.V)
    chance = max(chance_level(k, m), chance_level(k, n))
    tau = threshold_for(chance, c)
    return LayerSimilarity(
        source_key=source_key,
        target_key=target_key,
        phi_left=phi_left,
        phi_right=phi_right,
        chance=chance,
        rank=k,
        threshold=tau,
        passed=min(phi_left, phi_right) >= tau,
    )


def compute_similarity(
    source: WeightSource,
    target: WeightSource,
    pairs: list[tuple[str, str]],
    rank: int = 320,
    threshold: float = 0.5,
    *,
    cache: SubspaceCache | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    provider: SubspaceProvider | None = None,
) -> SimilarityTable:
    """Φ for each ``(source key, target key)`` pair of base weights.

    Each weight's top-R subspace is computed once (float32; via ``cache`` when given) and
    compared at the decision rank ``k = similarity_rank(R, out, in)``.

    Args:
        source, target: the two base models.
        pairs: model-key pairs to compare; pairs whose flattened shapes differ are recorded as
            not compared (``passed=False``) with the reason, never raised.
        rank: R, the transfer rank; clipped per layer.
        threshold: c of :func:`threshold_for`.
        cache: a subspace cache (``get_or_compute``), or ``None`` for a per-call dict.
        device: where the decompositions run.
        progress: ``progress(done, total)`` after each pair.
        provider: share decompositions with a caller (``transfer_adapter`` passes its own).

    Raises:
        OptionError: threshold outside [0, 1]. RankError: rank < 1.
    """
    if not isinstance(rank, int) or rank < 1:
        raise RankError(f"similarity: rank must be a positive integer (the paper uses 320); got {rank!r}.")
    threshold_for(0.0, threshold)  # validates c before any decomposition runs
    subspaces = provider or SubspaceProvider(cache, device)
    table = SimilarityTable()
    done = 0

    def request(pair: tuple[str, str]) -> tuple[str, str, int] | None:
        shape = flat_shape(source.shape(pair[0]))
        return (*pair, min(rank, *shape)) if flat_shape(target.shape(pair[1])) == shape else None

    try:
        for chunk in prefetched_chunks(subspaces, source, target, pairs, request):
            for skey, tkey in chunk:
                table.entries.append(_pair_similarity(source, target, skey, tkey, rank, threshold, subspaces))
                done += 1
                if progress is not None:
                    progress(done, len(pairs))
    finally:
        subspaces.flush()
    return table


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


def _pair_similarity(
    source: WeightSource,
    target: WeightSource,
    skey: str,
    tkey: str,
    rank: int,
    threshold: float,
    subspaces: SubspaceProvider,
) -> LayerSimilarity:
    """One pair's :class:`LayerSimilarity` (not compared, with the reason, when the widths differ)."""
    sshape, tshape = flat_shape(source.shape(skey)), flat_shape(target.shape(tkey))
    if sshape != tshape:
        return LayerSimilarity(
            skey,
            tkey,
            None,
            None,
            None,
            None,
            None,
            False,
            reason=f"width mismatch: source {sshape[0]}×{sshape[1]} vs target {tshape[0]}×{tshape[1]}",
        )
    R = min(rank, *sshape)
    return layer_similarity(
        subspaces.get(source, skey, R),
        subspaces.get(target, tkey, R),
        similarity_rank(R, *sshape),
        threshold,
        source_key=skey,
        target_key=tkey,
    )
