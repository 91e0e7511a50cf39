"""LoRA-X files beyond their cores: export to a standard LoRA, and the record of their source bases.

A LoRA-X layer is ``ΔW = U_R · core · V_Rᵀ`` in the top-R singular bases of its *source* weight
(arXiv 2501.16559, §4.1, Eq. 1); the file stores only the core and the shape.

* Export: the same ΔW as a standard LoRA, ``up = U_R·core`` and ``down = V_Rᵀ`` (rank R, exact;
  :func:`lorax_to_standard`), optionally re-compressed to a smaller rank with the relative
  Frobenius error stated (:func:`compress_standard`, Eckart–Young through
  :func:`lorax_core.linalg.recompress`). For the diagonal core the rank-R factors already are
  an SVD (U_R, V_R orthonormal), so rank r keeps the r largest ``|δ_i|``.
* Bases: a file is meaningful only with the bases it was trained in. :func:`basis_record`
  stores, for a few layers, where the source's leading singular directions point (their
  projections on a fixed probe vector, sign-sensitive); :func:`check_lorax_source` recomputes
  them from a candidate source — through the same subspace code and cache as the transfer —
  and refuses a source whose bases differ (another model, a re-parameterised copy, another
  sign convention). The probe is a fixed cosine sequence, identical on every machine.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .errors import FormatError, IncompatibleBaseError, RankError
from .linalg import SUBSPACE_VERSION, Subspace, recompress
from .subspaces import SubspaceProvider
from .transfer import lorax_to_lora, restore_layout
from .types import AdapterLayer, LoraFactors, LoraXFactors, WeightSource, flat_shape

__all__ = [
    "BASIS_KEY",
    "BASIS_TOLERANCE",
    "StandardExport",
    "basis_record",
    "check_lorax_source",
    "compress_standard",
    "lorax_to_standard",
]

#: Metadata key of the basis record (a JSON string; see :func:`basis_record`).
BASIS_KEY = "lorax.basis_check"
#: Largest relative difference of the probe projections that still counts as the same bases.
#: Bases recomputed from the same weights differ by ~1e-6 (float32), ~4e-4 from the float16 disk
#: cache and ~1e-3 from a float16 copy of the weights; unrelated weights give ~1.
BASIS_TOLERANCE = 0.05
# At most this many layers and directions are recorded: enough to tell models apart, and the
# record stays a few kB of metadata.
_RECORD_LAYERS = 4
_RECORD_DIRECTIONS = 8
# Directions whose singular value is closer than this (relative to σ₁) to a neighbour's are not
# recorded: such a pair may rotate within its plane between machines (rounding), which says
# nothing about whether the model is the same.
_MIN_GAP = 1e-3
_PROBE = "cos-golden-v1"


def _probe(n: int, device: torch.device) -> torch.Tensor:
    # cos(1 + j·golden angle), unit norm: deterministic, with no period that lines up with units.
    j = torch.arange(n, dtype=torch.float64)
    p = torch.cos(1.0 + j * 2.399963229728653)
    return (p / p.norm()).to(device=device, dtype=torch.float32)


def _directions(sub: Subspace) -> list[int]:
    S = sub.S.detach().to("cpu", torch.float64)
    if S.numel() < 2 or float(S[0]) <= 0.0:
        return []
    out = []
    # The last direction's lower neighbour is not in the subspace; only interior ones are used.
    for i in range(min(S.numel() - 1, _RECORD_DIRECTIONS)):
        gaps = [float(S[i] - S[i + 1])] + ([float(S[i - 1] - S[i])] if i > 0 else [])
        if min(gaps) >= _MIN_GAP * float(S[0]):
            out.append(i)
    return out


def _projections(sub: Subspace, directions: list[int]) -> list[float]:
    index = torch.tensor(directions, dtype=torch.int64, device=sub.U.device)
    u = _probe(sub.U.shape[0], sub.U.device) @ sub.U[:, index]
    v = _probe(sub.V.shape[0], sub.V.device) @ sub.V[:, index]
    return [float(x) for x in torch.cat([u, v]).cpu()]


def basis_record(
    layers: Mapping[str, LoraXFactors], bases: Callable[[str, int], Subspace], fingerprint: str
) -> dict[str, str]:
    """The metadata that ties a LoRA-X file to its source bases.

    Args:
        layers: ``{source model key: LoraXFactors}`` of the file.
        bases: ``bases(key, R)`` → the subspace the cores were trained in (the trainer's own
            provider, so nothing is recomputed).
        fingerprint: the source model's fingerprint (``WeightSource.fingerprint``), recorded for
            the user; the check itself compares bases, since a ComfyUI ``MODEL`` and the file it
            was loaded from have different fingerprints.

    Returns:
        ``{"lorax.source_fingerprint", "lorax.rank", "lorax.subspace_version", BASIS_KEY}`` as
        strings. ``lorax.rank`` is R (the largest when layers were clipped to smaller widths).
        The record holds up to 4 layers spread over the sorted keys, each with up to 8 leading
        directions whose singular values are separated from their neighbours.
    """
    keys = sorted(layers)
    step = max(1, len(keys) // _RECORD_LAYERS)
    record: dict[str, dict[str, object]] = {}
    for key in keys[::step]:
        if len(record) == _RECORD_LAYERS:
            break
        rank = layers[key].rank
        sub = bases(key, rank)
        directions = _directions(sub)
        if directions:
            record[key] = {"rank": rank, "dirs": directions, "proj": _projections(sub, directions)}
    return {
        "lorax.source_fingerprint": fingerprint,
        "lorax.rank": str(max((f.rank for f in layers.values()), default=0)),
        "lorax.subspace_version": SUBSPACE_VERSION,
        BASIS_KEY: json.dumps({"probe": _PROBE, "layers": record}, separators=(",", ":")),
    }


def check_lorax_source(
    metadata: Mapping[str, str], layers: Mapping[str, AdapterLayer], source: WeightSource, provider: SubspaceProvider
) -> str:
    """Refuse a source model whose bases differ from those a LoRA-X file was trained in.

    Recomputes the recorded layers' subspaces from ``source`` with ``provider`` (the transfer's
    provider and cache: the transfer then reuses them) and compares the probe projections.

    Args:
        metadata: the LoRA-X file's metadata (``LoraFile.metadata``).
        layers: the adapter's layers (``LoraFile.layers`` or the planned ones); without a
            LoRA-X layer there is nothing to check, so any adapter can be passed.
        source: the source model the transfer is about to read the bases from.
        provider: the transfer's subspace provider.

    Returns:
        One line for the report: what was checked, or that the file has no record (files
        written before the record existed, or by other tools; their bases cannot be checked);
        ``""`` for an adapter without LoRA-X layers.

    Raises (messages without a host prefix: the node or command adds its name, ``with_context``):
        FormatError: the record is damaged.
        IncompatibleBaseError: a recorded layer is missing from ``source``, has another shape, or
            its bases differ by more than :data:`BASIS_TOLERANCE`.
    """
    if not any(isinstance(layer, LoraXFactors) for layer in layers.values()):
        return ""
    raw = metadata.get(BASIS_KEY)
    if raw is None:
        return "LoRA-X bases not checked: the file has no lorax.basis_check record (written by an older tool)."
    try:
        layers = json.loads(raw)["layers"]
        entries = {
            str(k): (int(v["rank"]), [int(i) for i in v["dirs"]], [float(x) for x in v["proj"]])
            for k, v in layers.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        raise FormatError(
            f"the LoRA-X file's {BASIS_KEY} metadata is damaged; re-save the adapter with Save LoRA-X "
            "(or remove the key to skip the check)."
        ) from None
    fingerprint = metadata.get("lorax.source_fingerprint", "unknown")
    fix = (
        f"connect the source model the LoRA-X adapter was trained on (fingerprint {fingerprint}): a LoRA-X file "
        "stores only ΔΣ, whose meaning is the source weight's singular bases (LoRA-X, arXiv 2501.16559, §4.1)."
    )
    worst = 0.0
    for key, (rank, directions, proj) in entries.items():
        if key not in source:
            raise IncompatibleBaseError(f"layer {key} of the LoRA-X file is not in the source model; {fix}")
        shape = source.shape(key)
        flat = flat_shape(shape)
        if rank > min(flat) or max(directions, default=-1) >= rank or len(proj) != 2 * len(directions):
            raise IncompatibleBaseError(
                f"layer {key} of the LoRA-X file (rank {rank}) does not fit the source's {shape} weight; {fix}"
            )
        got = _projections(provider.get(source, key, rank), directions)
        want = torch.tensor(proj, dtype=torch.float64)
        diff = float((torch.tensor(got, dtype=torch.float64) - want).norm() / want.norm().clamp_min(1e-12))
        if diff > BASIS_TOLERANCE:
            raise IncompatibleBaseError(
                f"the source model's bases of layer {key} differ from those the LoRA-X file was trained in "
                f"(relative difference {diff:.3g} > {BASIS_TOLERANCE}); {fix}"
            )
        worst = max(worst, diff)
    if not entries:
        return "LoRA-X bases not checked: the record holds no layer with well-separated singular values."
    return (
        f"LoRA-X bases checked on {len(entries)} layers: same as the training source (largest difference {worst:.2g})."
    )


def lorax_to_standard(
    layers: Mapping[str, LoraXFactors], bases: Callable[[str, int], Subspace]
) -> dict[str, LoraFactors]:
    """Every LoRA-X layer as the exact standard LoRA ``up = U_R·core``, ``down = V_Rᵀ`` (rank R).

    Args:
        layers: ``{key: LoraXFactors}``.
        bases: ``bases(key, R)`` → the source subspace with at least R directions.

    Returns:
        ``{key: LoraFactors}`` float32 on the CPU, ``alpha=None`` (scale 1), conv layers in conv
        layout; ``up @ down`` equals the LoRA-X ΔW up to float32 rounding.
    """
    out = {}
    for key, f in layers.items():
        lora = lorax_to_lora(f, bases(key, f.rank))
        out[key] = restore_layout(lora.up, lora.down, f.shape, torch.float32)
    return out


@dataclass
class StandardExport:
    """A standard LoRA made from a LoRA-X adapter.

    Attributes:
        layers: ``{key: LoraFactors}`` (float32, CPU, conv layout for conv layers).
        rank: the rank asked for (``None``: each layer at its own R, exact).
        errors: ``{key: ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F}`` (0 for exact layers and for ΔW = 0).
    """

    layers: dict[str, LoraFactors]
    rank: int | None
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def summary(self) -> str:
        """One line: the rank and the relative error (largest and over the whole adapter)."""
        if self.rank is None:
            return f"standard LoRA: {len(self.layers)} layers at their LoRA-X rank R (exact: up = U_R·δ, down = V_Rᵀ)."
        worst = max(self.errors, key=self.errors.__getitem__) if self.errors else ""
        return (
            f"standard LoRA: {len(self.layers)} layers compressed to rank ≤ {self.rank}; relative ΔW error "
            f"(Frobenius) largest {self.max_error:.3g}" + (f" ({worst})" if worst else "") + "."
        )


def compress_standard(layers: Mapping[str, LoraFactors], rank: int | None) -> StandardExport:
    """Re-compress exact rank-R factors to at most ``rank`` (best approximation, error stated).

    Layers whose rank is already ≤ ``rank`` are kept as they are (error 0). A layer whose ΔW is
    zero (an untrained core) keeps one zero direction so that it stays a valid LoRA layer.

    Raises:
        RankError: ``rank`` < 1.
    """
    if rank is None:
        return StandardExport(layers=dict(layers), rank=None, errors=dict.fromkeys(layers, 0.0))
    if rank < 1:
        raise RankError(f"standard LoRA rank must be ≥ 1 (0 keeps each layer's R); got {rank}.")
    out, errors = {}, {}
    for key, f in layers.items():
        if f.rank <= rank:
            out[key], errors[key] = f, 0.0
            continue
        shape = (f.up.shape[0], *f.down.shape[1:])
        up, down, kept = recompress(f.up2d().float() * f.scale, f.down2d(), rank)
        if up.shape[1] == 0:
            up, down = up.new_zeros(up.shape[0], 1), down.new_zeros(1, down.shape[1])
        out[key] = restore_layout(up, down, shape, torch.float32)
        errors[key] = math.sqrt(max(0.0, 1.0 - kept))
    return StandardExport(layers=out, rank=rank, errors=errors)
