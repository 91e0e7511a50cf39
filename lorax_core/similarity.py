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

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from .errors import OptionError, RankError
from .linalg import Subspace
from .subspaces import SubspaceProvider, prefetched_chunks
from .types import WeightSource, flat_shape

if TYPE_CHECKING:
    from .cache import SubspaceCache

__all__ = [
    "LayerSimilarity",
    "SimilarityTable",
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
