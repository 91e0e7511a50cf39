"""Low-precision base weights: fp8 (e4m3fn, e5m2) and ComfyUI's *scaled* fp8 layout.

fp8 tensors are only ever *stored* in fp8 here: every check and every decomposition works on a
float32 copy of one layer at a time (never the whole model), because not every torch build has
fp8 kernels (``isfinite``, matmul) and fp8's 2–3 mantissa bits cannot carry a decomposition.

ComfyUI's scaled fp8 (``comfy/ops.py``, ``scaled_fp8_ops``, v0.3.75) stores each quantised
Linear weight ``W`` as an fp8 tensor ``<module>.weight`` plus a float32 scalar
``<module>.scale_weight`` (and, for fp8 matmuls, ``<module>.scale_input``); the file is marked
by a tensor named ``scaled_fp8`` (``[prefix]scaled_fp8``; its dtype is the storage fp8 type).
ComfyUI's ``convert_weight`` dequantises as ``weight.to(float32) * scale_weight.to(float32)``;
:func:`dequantize_scaled_fp8` computes exactly that.
"""

from __future__ import annotations

import torch

from .errors import FormatError, NonFiniteError

__all__ = [
    "FP8_DTYPES",
    "SCALED_FP8_MARKER",
    "SCALE_INPUT",
    "SCALE_WEIGHT",
    "check_scale",
    "dequantize_scaled_fp8",
    "nonfinite_count",
    "upcast",
]

FP8_DTYPES: frozenset[torch.dtype] = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})
#: ComfyUI's marker tensor name (after the model prefix) and per-layer scale suffixes.
SCALED_FP8_MARKER = "scaled_fp8"
SCALE_WEIGHT = "scale_weight"
SCALE_INPUT = "scale_input"


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as float32 if it is stored in fp8, else unchanged (one layer: the caller's unit)."""
    return tensor.to(torch.float32) if tensor.dtype in FP8_DTYPES else tensor


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many NaN/Inf values a floating-point tensor holds; fp8 is checked on a float32 copy.

    fp8 e4m3fn has no Inf but has NaN; e5m2 has both. Torch builds without fp8 kernels raise
    ``NotImplementedError`` for ``isfinite`` on fp8, hence the upcast (exact: every fp8 value
    is a float32 value).
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    return int((~torch.isfinite(upcast(tensor))).sum())


def check_scale(scale: torch.Tensor | None, *, where: str, name: str, required: bool) -> None:
    """Check a scaled-fp8 scale tensor: one float scalar (shape ``()`` or ``(1,)``), finite.

    Args:
        scale: the tensor, or ``None`` when the file lacks it.
        where: the file (for the message); name: the scale tensor's name in the file.
        required: whether a missing scale is an error (``scale_weight`` of an fp8 weight is;
            ``scale_input`` is optional, ComfyUI uses it only for fp8 matmuls).

    Raises:
        FormatError: missing (when required), not a single floating-point number.
        NonFiniteError: NaN or Inf.
    """
    fix = "re-create the file with ComfyUI's scaled-fp8 export, or use the unscaled model"
    if scale is None:
        if required:
            raise FormatError(
                f"{where}: scaled-fp8 model (it has a '{SCALED_FP8_MARKER}' marker) but weight "
                f"{name.rsplit('.', 1)[0]}.weight is fp8 without its scale {name!r}; the layer cannot be "
                f"dequantised. The file is incomplete: {fix}."
            )
        return
    if not scale.is_floating_point() or scale.numel() != 1:
        raise FormatError(
            f"{where}: scale tensor {name!r} has shape {tuple(scale.shape)} and dtype "
            f"{str(scale.dtype).removeprefix('torch.')}; ComfyUI's scaled fp8 stores one float32 number per layer "
            f"(shape () or (1,)). The file is malformed: {fix}."
        )
    if nonfinite_count(scale):
        raise NonFiniteError(
            f"{where}: scale tensor {name!r} is {float(upcast(scale).reshape(()))} (NaN or Inf); the layer's "
            f"weights cannot be dequantised. The file is damaged: {fix}."
        )


def dequantize_scaled_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``weight.to(float32) * scale.to(float32)``: ComfyUI's ``convert_weight`` of ``scaled_fp8_ops``.

    Args:
        weight: the stored (fp8) weight or a row slice of it, any shape.
        scale: its ``scale_weight`` (checked with :func:`check_scale`).

    Returns:
        A float32 CPU tensor of ``weight``'s shape.
    """
    return weight.to(torch.float32) * scale.to(torch.float32).reshape(())
