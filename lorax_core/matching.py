"""Pair source layers with target layers: by name, or by subspace similarity.

Fine-tunes of one checkpoint (RealisticVision from SD-1.5, RealVisXL from SDXL) share every
key, so pairing by name is exact. Distilled models drop blocks (SDXL → SSD-1B keeps about 40
of 70 attention layers, ProLoRA arXiv 2506.04244), so the surviving target layers must be
found: among target layers of the same *kind* (``attn1.to_q`` with ``attn1.to_q``,
``ff.net.2`` with ``ff.net.2``…) and the same shape, pick the one-to-one assignment that
maximises the total similarity Φ (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``;
LoRA-X §4.2.3 matches modules by Eq. 4, METHOD.md §5 "practical recipe").
Whether a matched pair is similar *enough* is decided later by the transfer, against the
threshold; matching only proposes partners and says why a layer has none.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .errors import OptionError
from .similarity import LayerSimilarity, SubspaceProvider, layer_similarity, similarity_rank
from .types import WeightSource

__all__ = ["LayerMatch", "layer_kind", "match_layers"]

MatchMode = Literal["name", "similarity", "auto"]

# Container modules whose numeric child index is a position, not a kind: everything up to and
# including the last such "<container>.<index>" run is dropped from the kind.
_CONTAINER = re.compile(r"(.*_)?blocks?$|attentions|resnets|upsamplers|downsamplers|layers|transformer_blocks")

NO_NAME = "target model has no layer with this name"
NO_PARTNER = "no target layer of the same kind and shape"
ALL_TAKEN = "every same-kind, same-shape target layer is already paired with a more similar source layer"


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


def _flat(shape: Sequence[int]) -> tuple[int, int]:
    rest = 1
    for d in shape[1:]:
        rest *= int(d)
    return int(shape[0]), rest


@dataclass
class LayerMatch:
    """The target partner proposed for one source layer.

    Attributes:
        source_key: source model key.
        target_key: the partner's model key, or ``None`` when there is none.
        by: ``"name"``, ``"similarity"`` or ``"none"``.
        reason: why there is no partner (empty when there is one).
        similarity: Φ of the pair when it was matched by similarity.
    """

    source_key: str
    target_key: str | None
    by: str
    reason: str = ""
    similarity: LayerSimilarity | None = None


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
            layers; ``auto`` – by name where the target has the key with the same shape,
            by similarity for the rest (target layers already paired by name are not reused).
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
    pending: list[str] = []
    for key in keys:
        if mode == "name":
            if key in target_shapes:
                result[key] = LayerMatch(key, key, "name")
            else:
                result[key] = LayerMatch(key, None, "none", NO_NAME)
        elif mode == "auto" and key in target_shapes and _flat(target_shapes[key]) == _flat(source.shape(key)):
            result[key] = LayerMatch(key, key, "name")
        else:
            pending.append(key)
    if pending:
        claimed = {m.target_key for m in result.values() if m.target_key is not None}
        free = {k: s for k, s in target_shapes.items() if k not in claimed}
        result.update(_match_by_similarity(pending, source, target, free, rank, threshold, provider))
    return {key: result[key] for key in keys}


def _match_by_similarity(
    keys: list[str],
    source: WeightSource,
    target: WeightSource,
    target_shapes: dict[str, tuple[int, ...]],
    rank: int,
    threshold: float,
    provider: SubspaceProvider | None,
) -> dict[str, LayerMatch]:
    from scipy.optimize import linear_sum_assignment

    subspaces = provider or SubspaceProvider()
    groups: dict[tuple[str, tuple[int, int]], list[str]] = defaultdict(list)
    for key in keys:
        groups[(layer_kind(key), _flat(source.shape(key)))].append(key)
    candidates: dict[tuple[str, tuple[int, int]], list[str]] = defaultdict(list)
    for key, shape in target_shapes.items():
        candidates[(layer_kind(key), _flat(shape))].append(key)

    result: dict[str, LayerMatch] = {}
    for (kind, (m, n)), sources in groups.items():
        targets = candidates.get((kind, (m, n)), [])
        if not targets:
            for key in sources:
                result[key] = LayerMatch(key, None, "none", NO_PARTNER)
            continue
        R = min(rank, m, n)
        k = similarity_rank(R, m, n)
        table = [
            [
                layer_similarity(
                    subspaces.get(source, s, R),
                    subspaces.get(target, t, R),
                    k,
                    threshold,
                    source_key=s,
                    target_key=t,
                )
                for t in targets
            ]
            for s in sources
        ]
        phis = np.array([[entry.phi for entry in row] for row in table], dtype=np.float64)
        rows, cols = linear_sum_assignment(phis, maximize=True)
        assigned = dict(zip(rows.tolist(), cols.tolist(), strict=True))
        for i, key in enumerate(sources):
            if i in assigned:
                j = assigned[i]
                result[key] = LayerMatch(key, targets[j], "similarity", similarity=table[i][j])
            else:
                result[key] = LayerMatch(key, None, "none", ALL_TAKEN)
    return result
