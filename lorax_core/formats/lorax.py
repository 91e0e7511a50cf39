"""This project's LoRA-X format: per layer a core and the base weight's shape.

Keys (``<layer>`` is any layer name, usually the ComfyUI-native ``diffusion_model.<path>``):

* ``<layer>.lorax_core``: float, ``(R,)`` — the diagonal ΔΣ of LoRA-X (arXiv 2501.16559, Eq. 1)
  — or ``(R, R)`` for a full core.
* ``<layer>.lorax_shape``: int64, the base weight's shape ``(out, in)`` or ``(out, in, kh, kw)``.

ΔW = U_R · core · V_Rᵀ, with U_R/V_R the top-R singular vectors of the *source* base weight,
recomputed at load time in float32 with deterministic signs (:func:`lorax_core.linalg.top_subspace`);
the bases are not stored, so a file is only meaningful together with its source model, whose
fingerprint is recorded in the metadata key ``lorax.source_fingerprint`` when known.
File metadata: ``lorax.format = "lorax-core"``, ``lorax.format_version = "1"``.
"""

from __future__ import annotations

import torch

from ..errors import LoraxError
from ..quant import nonfinite_count
from ..types import AdapterLayer, LoraXFactors, flat_shape
from .base import LayerParts
from .keys import LORAX_CORE_SUFFIX, LORAX_SHAPE_SUFFIX, UNSUPPORTED_SUFFIXES, KeyStyle

__all__ = ["FORMAT_METADATA", "LORAX_STYLE", "LoraxHandler", "lorax_tensors"]

FORMAT_METADATA = {"lorax.format": "lorax-core", "lorax.format_version": "1"}
# LoRA-X layers have no up/down pair; the style only records that the layer was a core.
LORAX_STYLE = KeyStyle(LORAX_SHAPE_SUFFIX, LORAX_CORE_SUFFIX, alpha=False)


class LoraxHandler:
    """Claims layers that carry a ``.lorax_core`` tensor."""

    name = "lorax"
    default_style = LORAX_STYLE

    def claims(self, layer: str, parts: LayerParts) -> bool:
        return LORAX_CORE_SUFFIX in parts

    def build(self, layer: str, parts: LayerParts) -> tuple[AdapterLayer, KeyStyle] | str:
        extra = sorted(set(parts) - {LORAX_CORE_SUFFIX, LORAX_SHAPE_SUFFIX})
        if extra:
            reasons = {UNSUPPORTED_SUFFIXES.get(s, f"unexpected tensor {s}") for s in extra}
            return "LoRA-X layer mixed with other adapter tensors: " + "; ".join(sorted(reasons))
        core, shape_t = parts[LORAX_CORE_SUFFIX], parts.get(LORAX_SHAPE_SUFFIX)
        if shape_t is None:
            return f"LoRA-X layer without {LORAX_SHAPE_SUFFIX} (the base weight's shape); the file is incomplete"
        if shape_t.is_floating_point() or shape_t.ndim != 1 or shape_t.numel() not in (2, 4):
            return f"{LORAX_SHAPE_SUFFIX} must be 2 or 4 integers; got {shape_t.dtype} of shape {tuple(shape_t.shape)}"
        shape = tuple(int(d) for d in shape_t.tolist())
        if not core.is_floating_point():
            return f"{LORAX_CORE_SUFFIX} must be floating point; got {core.dtype}"
        if core.ndim not in (1, 2) or (core.ndim == 2 and core.shape[0] != core.shape[1]):
            return f"{LORAX_CORE_SUFFIX} must be a vector (R,) or a square matrix (R, R); got shape {tuple(core.shape)}"
        if core.shape[0] == 0:
            return "rank-0 LoRA-X layer (an empty core: it changes nothing); not transferable"
        if nonfinite_count(core):  # an fp8 core is checked on a float32 copy
            return f"NaN or Inf values in {LORAX_CORE_SUFFIX.lstrip('.')} (the file is damaged); not transferable"
        if min(shape) < 1 or core.shape[0] > min(flat_shape(shape)):
            return f"LoRA-X rank {core.shape[0]} does not fit a base weight of shape {shape}"
        try:
            return LoraXFactors(core=core, shape=shape), LORAX_STYLE
        except LoraxError as exc:
            return str(exc)


def lorax_tensors(name: str, factors: LoraXFactors) -> dict[str, torch.Tensor]:
    """The file tensors of one LoRA-X layer: its core (own dtype) and its int64 base shape."""
    return {
        f"{name}{LORAX_CORE_SUFFIX}": factors.core,
        f"{name}{LORAX_SHAPE_SUFFIX}": torch.tensor(factors.shape, dtype=torch.int64),
    }
