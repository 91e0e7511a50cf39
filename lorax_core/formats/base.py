"""What every format handler shares: the parsed-file dataclass and the LoRA pair reader/writer.

A handler (one small module per format) only decides which layers it *claims* and, for
LoRA-X, how a layer is built; the arithmetic of ``up``/``down``/``alpha`` lives here once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from ..errors import LoraxError, NonFiniteError
from ..quant import nonfinite_count
from ..types import AdapterLayer, LoraFactors, SkipReason, SkipText
from .keys import ALPHA_SUFFIX, KOHYA_STYLE, PAIR_STYLES, UNSUPPORTED_SUFFIXES, KeyStyle

__all__ = [
    "FormatHandler",
    "LayerParts",
    "LoraFile",
    "build_pair",
    "layer_tensors",
    "pair_style",
    "pair_tensors",
]

LayerParts = Mapping[str, torch.Tensor]
"""One layer's tensors keyed by suffix, e.g. ``{".lora_down.weight": down, ".alpha": alpha}``."""


@dataclass
class LoraFile:
    """A LoRA file read into layers.

    Attributes:
        format: the handler that claimed most layers (``kohya``, ``comfy``, ``peft``, ``lorax``).
        layers: ``{layer name: LoraFactors | LoraXFactors}`` in the file's dtype, on CPU, with
            ``alpha`` exactly as read (``None`` when the file had no ``.alpha``), or, for PEFT
            layers without one, the alpha that reproduces the scale diffusers reads from the
            file's ``lora_adapter_metadata`` (:func:`~lorax_core.formats.peft.metadata_alphas`).
        unsupported: ``{layer name or key: reason}`` for everything that is not a transferable
            layer (LoHa, LoKr, DoRA, tucker, ``.diff`` …, unknown keys). Never silently dropped.
        metadata: the file's string metadata.
        styles: ``{layer name: KeyStyle}``, how each layer was spelled (for writing back).
        layer_formats: ``{layer name: handler name}`` (files may mix styles).
        path: where it was read from, when read from a file.
    """

    format: str
    layers: dict[str, AdapterLayer]
    unsupported: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    styles: dict[str, KeyStyle] = field(default_factory=dict)
    layer_formats: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    def ranks(self) -> dict[str, int]:
        """``{layer name: rank}`` (R for LoRA-X layers)."""
        return {name: layer.rank for name, layer in self.layers.items()}


class FormatHandler(Protocol):
    """A LoRA format: claims the layers whose names/suffixes it understands and builds them."""

    name: str
    default_style: KeyStyle

    def claims(self, layer: str, parts: LayerParts) -> bool:
        """Whether this format understands ``layer`` (by its name and tensor suffixes)."""
        ...

    def build(self, layer: str, parts: LayerParts) -> tuple[AdapterLayer, KeyStyle] | str:
        """The layer's factors and key style, or a reason why it is not transferable."""
        ...


def pair_style(parts: LayerParts) -> KeyStyle | None:
    """The first (down, up) suffix pair of which ``parts`` holds at least one side."""
    for style in PAIR_STYLES:
        if style.down in parts or style.up in parts:
            return style
    return None


def build_pair(layer: str, parts: LayerParts) -> tuple[AdapterLayer, KeyStyle] | SkipText:
    """Build a standard or LyCORIS layer (:func:`_build_pair`); a reason comes back as a
    :class:`~lorax_core.types.SkipText` coded ``unsupported`` (a type no reader here
    understands) or ``malformed_layer`` (damaged or inconsistent tensors)."""
    built = _build_pair(layer, parts)
    if isinstance(built, SkipText):
        return built
    if isinstance(built, str):
        code = SkipReason.UNSUPPORTED if any(s in UNSUPPORTED_SUFFIXES for s in parts) else SkipReason.MALFORMED
        return SkipText(built, code)
    return built


def _build_pair(layer: str, parts: LayerParts) -> tuple[AdapterLayer, KeyStyle] | str:
    """Build a standard LoRA layer from its suffix → tensor map, or say why it cannot be.

    ``alpha`` is kept exactly as read (a 0-d or 1-element tensor → float); no scale is applied.
    Conv layers keep their 4-D file shapes (``up (out, r, 1, 1)``, ``down (r, in, kh, kw)``).
    A layer that cannot be used — wrong dimensions, rank 0, NaN or ±Inf in a factor or in
    alpha — is returned as a reason (reported as a skipped layer), never raised: one damaged
    layer does not stop the rest of the file.
    """
    reasons = sorted({UNSUPPORTED_SUFFIXES[s] for s in parts if s in UNSUPPORTED_SUFFIXES})
    if reasons:
        return "; ".join(reasons)
    style = pair_style(parts)
    # LoHa, LoKr, Tucker LoCon, DoRA and .diff layers (imported here: lorax_core.lycoris reads
    # this package's key tables, so a module-level import would be circular).
    from ..lycoris import build_lycoris

    lycoris = build_lycoris(layer, parts)
    if isinstance(lycoris, str):
        return lycoris
    if lycoris is not None:
        return lycoris, style or KOHYA_STYLE
    if style is None:
        found = ", ".join(sorted(parts))
        return f"no up/down factors (found only {found}); not a LoRA layer"
    down, up = parts.get(style.down), parts.get(style.up)
    if down is None or up is None:
        missing = style.down if down is None else style.up
        return f"incomplete LoRA layer: {missing} is missing"
    if not (down.is_floating_point() and up.is_floating_point()):
        return f"LoRA factors must be floating point; got {up.dtype} and {down.dtype}"
    alpha_t = parts.get(ALPHA_SUFFIX)
    alpha: float | None = None
    if alpha_t is not None:
        if alpha_t.numel() != 1:
            return f"alpha must be a single number; got shape {tuple(alpha_t.shape)}"
        alpha = float(alpha_t.reshape(()).to(torch.float32))
        if not math.isfinite(alpha):
            return f"alpha is {alpha} (NaN or Inf: the file is damaged); not transferable"
    try:
        factors = LoraFactors(up=up, down=down, alpha=alpha)
    except LoraxError as exc:
        return str(exc)
    if factors.rank == 0:
        return "rank-0 LoRA layer (its factors have no columns: it changes nothing); not transferable"
    for suffix, tensor in ((style.up, up), (style.down, down)):
        if nonfinite_count(tensor):  # fp8 factors are checked on a float32 copy
            return f"NaN or Inf values in {suffix.lstrip('.')} (the file is damaged); not transferable"
    return factors, KeyStyle(style.down, style.up, alpha=alpha_t is not None)


def pair_tensors(name: str, factors: LoraFactors, style: KeyStyle) -> dict[str, torch.Tensor]:
    """The file tensors of one LoRA layer in ``style``, with ``alpha = rank`` (or no alpha).

    Every loader (kohya/A1111, ComfyUI, diffusers) computes ``scale = alpha / rank`` (1 without
    alpha), so writing ``alpha = rank`` — or no alpha — with any other scale folded into ``up``
    makes them all compute the same ΔW. The fold runs in float32 and returns the factor's dtype.

    When the folded ``up`` does not fit that dtype (a large scale on float16 factors overflows
    to Inf), the scale is kept in ``alpha`` instead (``up`` unchanged, ``alpha`` as read) for
    styles that have an alpha; PEFT style has none, so that layer is written in float32.

    Raises:
        NonFiniteError: the folded update overflows even float32.
    """
    up, down = factors.up, factors.down
    alpha = float(factors.rank)
    if factors.scale != 1.0:
        folded = up.to(torch.float32) * factors.scale
        if not bool(torch.isfinite(folded).all()):
            raise NonFiniteError(
                f"layer {name!r}: alpha/rank = {factors.scale:g} times up overflows float32; the layer's alpha "
                "is not plausible. Check the LoRA file."
            )
        up = folded.to(factors.up.dtype)
        if nonfinite_count(up):  # an fp8 LoRA: e4m3fn overflows to NaN
            if style.alpha:
                up, alpha = factors.up, float(factors.alpha)  # type: ignore[arg-type]  # scale != 1 ⇒ alpha set
            else:
                up, down = folded, down.to(torch.float32)
    out = {f"{name}{style.down}": down, f"{name}{style.up}": up}
    if style.alpha:
        out[f"{name}{ALPHA_SUFFIX}"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def layer_tensors(name: str, layer: LoraFactors, style: KeyStyle) -> dict[str, torch.Tensor]:
    """The file tensors of one standard or LyCORIS layer (:class:`~lorax_core.lycoris.LycorisLayer`).

    A LyCORIS layer with its own tensors (``parts``) is written in its own type, plus its DoRA
    magnitude; one without (a LoRA carrying a re-derived DoRA magnitude) is written as a LoRA pair
    in ``style`` (:func:`pair_tensors`) plus its ``.dora_scale``.
    """
    from ..lycoris import LycorisLayer, lycoris_tensors

    if isinstance(layer, LycorisLayer) and layer.parts:
        return lycoris_tensors(name, layer)
    out = pair_tensors(name, layer, style)
    if isinstance(layer, LycorisLayer) and layer.dora_scale is not None:
        out.update(lycoris_tensors(name, layer))
    return out
