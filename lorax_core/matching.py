"""Pair source layers with target layers: by name, or by subspace similarity.

Fine-tunes of one checkpoint (RealisticVision from SD-1.5, RealVisXL from SDXL) share every
key, so pairing by name is exact. Distilled models drop blocks (SDXL → SSD-1B keeps about 40
of 70 attention layers, ProLoRA arXiv 2506.04244), so the surviving target layers must be
found: among target layers of the same *kind* (``attn1.to_q`` with ``attn1.to_q``,
``ff.net.2`` with ``ff.net.2``…) and the same shape, pick the one-to-one assignment that
maximises the total similarity Φ (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``;
LoRA-X, arXiv 2501.16559, §4.2.3 matches modules by Eq. 4).
Whether a matched pair is similar *enough* is decided later by the transfer, against the
threshold; matching only proposes partners and says why a layer has none.

In ``auto`` mode a shared name is a hint, not a verdict. A distilled model that keeps some of a
block's layers renumbers them consecutively (SSD-1B keeps 4 of SDXL's 10 transformer blocks in
``input_blocks.7.1`` as ``transformer_blocks.0..3``), so the same name may hold another layer.
Where a layer's *container* (``….transformer_blocks``, ``….encoder.layers``) has a different
depth in the two models, each same-named pair is checked: kept when Φ passes the threshold, else
the layer is paired by similarity among the free same-kind, same-shape layers of the same
container (of the whole model when that container has none). Containers of equal depth keep
pairing by name with no extra decomposition.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .errors import NonFiniteError, OptionError
from .similarity import LayerSimilarity, layer_similarity, similarity_rank
from .subspaces import SubspaceProvider
from .types import SkipReason, WeightSource, flat_shape

__all__ = ["LayerMatch", "depth_mismatches", "layer_kind", "match_layers"]

MatchMode = Literal["name", "similarity", "auto"]

# Container modules whose numeric child index is a position, not a kind: everything up to and
# including the last such "<container>.<index>" run is dropped from the kind.
_CONTAINER = re.compile(r"(.*_)?blocks?$|attentions|resnets|upsamplers|downsamplers|layers|transformer_blocks")

NO_NAME = "target model has no layer with this name"
NO_PARTNER = "no target layer of the same kind and shape"
ALL_TAKEN = "every same-kind, same-shape target layer is already paired with a more similar source layer"
DEPTH_TAKEN = (
    "this block has another depth in the target (blocks dropped and renumbered, as in SSD-1B); each of its "
    "same-kind, same-shape layers is paired with a more similar source layer"
)
DEPTH_NONE = (
    "this block has another depth in the target (blocks dropped and renumbered, as in SSD-1B) and none of its "
    "same-kind, same-shape layers is similar to this one (its partner was dropped)"
)
NONFINITE = "the source weight holds NaN or Inf, so no partner can be found by similarity"


def layer_kind(key: str) -> str:
    """The module's role, independent of its position: the name after the last block index.

    Examples:
        ``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight`` → ``attn1.to_q``;
        ``…transformer_blocks.0.ff.net.0.proj.weight`` → ``ff.net.0.proj``;
        ``diffusion_model.input_blocks.4.0.in_layers.2.weight`` → ``in_layers.2``;
        ``diffusion_model.middle_block.1.proj_in.weight`` → ``proj_in``;
        diffusers ``down_blocks.1.resnets.0.conv1.weight`` → ``conv1``.
    """
    parts = key.split(".")
    if parts and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    cut = 0
    for i, part in enumerate(parts):
        if _CONTAINER.fullmatch(part) and i + 1 < len(parts) and parts[i + 1].isdigit():
            j = i + 1
            while j < len(parts) and parts[j].isdigit():
                j += 1
            cut = j
    return ".".join(parts[cut:]) or key


def _container(key: str) -> tuple[str, str] | None:
    """``(container path, position)`` of a key: where its last block index run starts.

    Examples:
        ``diffusion_model.input_blocks.7.1.transformer_blocks.3.attn1.to_q.weight`` →
        (``diffusion_model.input_blocks.7.1.transformer_blocks``, ``3``);
        ``diffusion_model.input_blocks.7.1.proj_in.weight`` → (``diffusion_model.input_blocks``, ``7.1``);
        ``diffusion_model.out.2.weight`` → ``None``.
    """
    parts = key.split(".")
    found: tuple[str, str] | None = None
    for i, part in enumerate(parts):
        if _CONTAINER.fullmatch(part) and i + 1 < len(parts) and parts[i + 1].isdigit():
            j = i + 1
            while j < len(parts) and parts[j].isdigit():
                j += 1
            found = (".".join(parts[: i + 1]), ".".join(parts[i + 1 : j]))
    return found


def _depths(keys: Iterable[str]) -> dict[str, int]:
    """``{container path: number of positions}`` over a model's weight keys."""
    positions: dict[str, set[str]] = defaultdict(set)
    for key in keys:
        found = _container(key)
        if found is not None:
            positions[found[0]].add(found[1])
    return {c: len(p) for c, p in positions.items()}


def depth_mismatches(source_keys: Iterable[str], target_keys: Iterable[str]) -> dict[str, tuple[int, int]]:
    """``{container: (source depth, target depth)}`` for the containers whose depth differs.

    A container is a module list indexed by position (``….transformer_blocks``,
    ``….encoder.layers``…); its depth is the number of positions among the given weight keys.
    SDXL → SSD-1B gives ``{"diffusion_model.input_blocks.7.1.transformer_blocks": (10, 4), …}``.
    """
    source, target = _depths(source_keys), _depths(target_keys)
    return {c: (d, target[c]) for c, d in source.items() if c in target and target[c] != d}


@dataclass
class LayerMatch:
    """The target partner proposed for one source layer.

    Attributes:
        source_key: source model key.
        target_key: the partner's model key, or ``None`` when there is none.
        by: ``"name"``, ``"similarity"`` or ``"none"``.
        reason: why there is no partner (empty when there is one).
        similarity: Φ of the pair when it was matched by similarity, or checked because its
            block's depth differs (``auto``).
        code: the skip reason as a value when there is no partner (``None`` when there is one):
            ``NO_PARTNER`` unless given (``NONFINITE_WEIGHT`` for a damaged source weight).
    """

    source_key: str
    target_key: str | None
    by: str
    reason: str = ""
    similarity: LayerSimilarity | None = None
    code: SkipReason | None = None

    def __post_init__(self) -> None:
        if self.target_key is None and self.code is None:
            self.code = SkipReason.NO_PARTNER


def _weight_keys(weights: WeightSource) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for key in weights.keys():
        shape = tuple(int(d) for d in weights.shape(key))
        if len(shape) in (2, 4):
            shapes[key] = shape
    return shapes


def match_layers(
    source_keys: Iterable[str],
    source: WeightSource,
    target: WeightSource,
    *,
    mode: MatchMode = "auto",
    rank: int = 320,
    threshold: float = 0.5,
    provider: SubspaceProvider | None = None,
) -> dict[str, LayerMatch]:
    """Propose a target layer for every source layer.

    Args:
        source_keys: source model keys of the adapter's layers (order kept in the result).
        source, target: the two base models.
        mode: ``name`` – the same key in the target (shapes are checked by the caller);
            ``similarity`` – optimal one-to-one assignment on Φ among same-kind, same-shape
            layers; ``auto`` – by name where the target has the key with the same shape and
            the key's container has the same depth in both models (or, where the depths
            differ, the same-named pair's Φ passes the threshold); by similarity for the rest,
            among the same container's free layers first (target layers already paired by name
            are not reused).
        rank: R, the subspace rank (Φ is taken at ``similarity_rank(R, out, in)``).
        threshold: c of ``threshold_for``; stored in the returned similarities.
        provider: shares subspace decompositions with the caller.

    Returns:
        ``{source key: LayerMatch}`` for every given key.

    Raises:
        OptionError: unknown ``mode``.
    """
    if mode not in ("name", "similarity", "auto"):
        raise OptionError(f"match must be 'name', 'similarity' or 'auto'; got {mode!r}.")
    keys = list(dict.fromkeys(source_keys))
    result: dict[str, LayerMatch] = {}
    target_shapes = _weight_keys(target)
    subspaces = provider or SubspaceProvider()
    pending: list[str] = []
    to_check: list[str] = []
    depth_changed: set[str] = set()
    if mode == "auto":
        depth_changed = set(depth_mismatches(_weight_keys(source), target_shapes))
    for key in keys:
        if mode == "name":
            if key in target_shapes:
                result[key] = LayerMatch(key, key, "name")
            else:
                result[key] = LayerMatch(key, None, "none", NO_NAME)
        elif (
            mode == "auto" and key in target_shapes and flat_shape(target_shapes[key]) == flat_shape(source.shape(key))
        ):
            found = _container(key)
            if found is not None and found[0] in depth_changed:
                to_check.append(key)
            else:
                result[key] = LayerMatch(key, key, "name")
        else:
            pending.append(key)
    for key in to_check:
        # The name is only a hint where depths differ: keep it when the pair is similar.
        sim = _pair_similarity(key, key, source, target, rank, threshold, subspaces)
        if sim is not None and sim.passed:
            result[key] = LayerMatch(key, key, "name", similarity=sim)
        else:
            pending.append(key)
    if pending:
        claimed = {m.target_key for m in result.values() if m.target_key is not None}
        free = {k: s for k, s in target_shapes.items() if k not in claimed}
        scoped = mode == "auto"
        result.update(
            _match_by_similarity(pending, source, target, free, rank, threshold, subspaces, scoped, depth_changed)
        )
    return {key: result[key] for key in keys}


def _pair_similarity(
    key: str,
    tkey: str,
    source: WeightSource,
    target: WeightSource,
    rank: int,
    threshold: float,
    subspaces: SubspaceProvider,
) -> LayerSimilarity | None:
    """Φ of one pair at the transfer's rank, or ``None`` when a weight holds NaN/Inf."""
    m, n = flat_shape(source.shape(key))
    R = min(rank, m, n)
    try:
        src, tgt = subspaces.get(source, key, R), subspaces.get(target, tkey, R)
    except NonFiniteError:
        return None
    return layer_similarity(src, tgt, similarity_rank(R, m, n), threshold, source_key=key, target_key=tkey)


def _match_by_similarity(
    keys: list[str],
    source: WeightSource,
    target: WeightSource,
    target_shapes: dict[str, tuple[int, ...]],
    rank: int,
    threshold: float,
    subspaces: SubspaceProvider,
    scoped: bool,
    depth_changed: set[str],
) -> dict[str, LayerMatch]:
    """Optimal one-to-one assignment on Φ, per (kind, shape[, container]) group.

    ``scoped`` (auto mode): a source layer competes first for the free same-kind, same-shape
    layers of its own container, so a renumbered block's layers meet only that block's layers
    (fast, and never a look-alike elsewhere); layers whose container has no such free layer
    compete for the whole model's, after the scoped groups have taken theirs.
    """
    from scipy.optimize import linear_sum_assignment

    candidates: dict[tuple[str, tuple[int, int]], list[str]] = defaultdict(list)
    for key, shape in target_shapes.items():
        candidates[(layer_kind(key), flat_shape(shape))].append(key)
    groups: dict[tuple[str, tuple[int, int], str | None], list[str]] = defaultdict(list)
    for key in keys:
        kind, flat = layer_kind(key), flat_shape(source.shape(key))
        found = _container(key) if scoped else None
        scope = None
        if found is not None and any(
            _container(t) is not None and _container(t)[0] == found[0] for t in candidates.get((kind, flat), [])
        ):
            scope = found[0]
        groups[(kind, flat, scope)].append(key)

    result: dict[str, LayerMatch] = {}
    taken: set[str] = set()
    bad_targets: set[str] = set()
    # Container-scoped groups first: their candidates are the most specific.
    for (kind, (m, n), scope), sources in sorted(groups.items(), key=lambda item: item[0][2] is None):
        targets = [
            t
            for t in candidates.get((kind, (m, n)), [])
            if t not in taken and t not in bad_targets and (scope is None or (_container(t) or ("", ""))[0] == scope)
        ]
        if not targets:
            for key in sources:
                # A namesake of another width: pair it, so that the transfer reports the width
                # mismatch with both shapes (SD1.5 → SD2 cross-attention: 320×768 vs 320×1024).
                result[key] = (
                    LayerMatch(key, key, "name") if key in target else LayerMatch(key, None, "none", NO_PARTNER)
                )
            continue
        R = min(rank, m, n)
        k = similarity_rank(R, m, n)
        tgt_spaces = {}
        for t in targets:
            try:
                tgt_spaces[t] = subspaces.get(target, t, R)
            except NonFiniteError:  # a damaged (or never loaded) weight is no candidate
                bad_targets.add(t)
        targets = [t for t in targets if t in tgt_spaces]
        rows_keys: list[str] = []
        table: list[list[LayerSimilarity]] = []
        for s in sources:
            try:
                src = subspaces.get(source, s, R)
            except NonFiniteError:
                result[s] = LayerMatch(
                    s,
                    s if s in target_shapes else None,
                    "name" if s in target_shapes else "none",
                    "" if s in target_shapes else NONFINITE,
                    code=None if s in target_shapes else SkipReason.NONFINITE_WEIGHT,
                )
                continue
            rows_keys.append(s)
            table.append(
                [layer_similarity(src, tgt_spaces[t], k, threshold, source_key=s, target_key=t) for t in targets]
            )
        if not targets:
            for key in rows_keys:
                result[key] = LayerMatch(key, None, "none", NO_PARTNER)
            continue
        if not rows_keys:  # every source layer of the group is damaged: nothing to assign
            continue
        phis = np.array([[entry.phi for entry in row] for row in table], dtype=np.float64).reshape(len(rows_keys), -1)
        rows, cols = linear_sum_assignment(phis, maximize=True)
        assigned = dict(zip(rows.tolist(), cols.tolist(), strict=True))
        for i, key in enumerate(rows_keys):
            if i in assigned and scope in depth_changed and not table[i][assigned[i]].passed:
                # A renumbered block's leftover layer meets only dropped layers' namesakes.
                result[key] = LayerMatch(key, None, "none", DEPTH_NONE, similarity=table[i][assigned[i]])
            elif i in assigned:
                j = assigned[i]
                taken.add(targets[j])
                by = "name" if scoped and targets[j] == key else "similarity"
                result[key] = LayerMatch(key, targets[j], by, similarity=table[i][j])
            else:
                reason = DEPTH_TAKEN if scope is not None and scope in depth_changed else ALL_TAKEN
                result[key] = LayerMatch(key, None, "none", reason)
    return result
