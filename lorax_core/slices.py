"""Slices of fused weights: one LoRA layer that patches part of a model tensor.

DiT families fuse projections into one weight: Flux's ``img_attn.qkv`` (q, k, v stacked along
the output dimension) and ``single_blocks.N.linear1`` (q, k, v and the MLP input), SD3's
``joint_blocks.N.x_block.attn.qkv``. Diffusers/PEFT LoRAs for them train ``to_q``, ``to_k``,
``to_v``… separately, and ComfyUI's key map (``comfy.lora.model_lora_keys_unet``) says which
rows each one patches with an entry ``(model key, (dim, offset, size))``; ComfyUI then applies
the update to ``weight.narrow(dim, offset, size)`` (``comfy.lora.calculate_weight``).

A slice is transferred as an ordinary ``(size, in)`` layer in its own singular subspaces (the
subspaces of the slice, not of the fused weight: the per-layer maths of LoRA-X, arXiv 2501.16559, §4, applies to the
matrix the update is added to) and written back under the LoRA's own layer name.

Representation: a :class:`WeightSlice`, spelled in the model-key namespace as the canonical
string ``<model key>[<dim>:<offset>:<size>]`` (:meth:`WeightSlice.key`, parsed back by
:func:`parse_slice_key`), so every place that keys by model key (the transfer's layer dicts,
the report, the subspace cache) tells the slices of one fused weight apart without any change.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["WeightSlice", "parse_slice_key", "slice_from_comfy"]

_SLICE = re.compile(r"^(?P<key>.+)\[(?P<dim>\d+):(?P<offset>\d+):(?P<size>\d+)\]$")


@dataclass(frozen=True)
class WeightSlice:
    """Part of a model tensor: ``tensor.narrow(dim, offset, size)``.

    Attributes:
        base: the fused tensor's model key (``diffusion_model.double_blocks.0.img_attn.qkv.weight``).
        dim: the dimension sliced (0, the output rows, for every fused weight ComfyUI maps).
        offset: first index along ``dim``.
        size: number of indices along ``dim`` (≥ 1).
    """

    base: str
    dim: int
    offset: int
    size: int

    @property
    def key(self) -> str:
        """The canonical model key of the slice, ``<base>[<dim>:<offset>:<size>]``."""
        return f"{self.base}[{self.dim}:{self.offset}:{self.size}]"

    def fits(self, shape: Sequence[int]) -> bool:
        """Whether the slice lies inside a tensor of ``shape``."""
        return self.dim < len(shape) and self.offset + self.size <= int(shape[self.dim])

    def shape(self, base_shape: Sequence[int]) -> tuple[int, ...]:
        """The slice's shape within a base tensor of ``base_shape`` (call :meth:`fits` first)."""
        out = [int(d) for d in base_shape]
        out[self.dim] = self.size
        return tuple(out)

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """The slice of ``tensor`` as a new contiguous tensor (same dtype and device; never a view,
        so callers may modify it without touching the base weight)."""
        return tensor.narrow(self.dim, self.offset, self.size).contiguous().clone()


def parse_slice_key(key: str) -> WeightSlice | None:
    """The slice a canonical key names, or ``None`` for an ordinary model key.

    Example: ``"diffusion_model.single_blocks.0.linear1.weight[0:0:3072]"`` →
    ``WeightSlice("diffusion_model.single_blocks.0.linear1.weight", 0, 0, 3072)``.
    """
    match = _SLICE.match(key)
    if match is None or int(match["size"]) < 1:
        return None
    return WeightSlice(match["key"], int(match["dim"]), int(match["offset"]), int(match["size"]))


def slice_from_comfy(base: str, spec: object) -> WeightSlice | None:
    """A :class:`WeightSlice` from a ComfyUI key-map slice entry ``(dim, offset, size)``.

    Returns ``None`` when ``spec`` is not three non-negative integers (with ``size`` ≥ 1): a
    slice description this version does not understand, which the caller reports.
    """
    if not isinstance(spec, (tuple, list)) or len(spec) != 3:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in spec):
        return None
    dim, offset, size = spec
    return WeightSlice(base, dim, offset, size) if size >= 1 else None
