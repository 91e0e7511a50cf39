"""ComfyUI-native naming: the model key without ``.weight`` (``diffusion_model.<path>``,
``text_encoders.<path>``) plus ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.

This is what ComfyUI's ``LoraSave`` and its trainer write, and the form ComfyUI's ``LoraLoader``
accepts for every model family. Bare model paths (``input_blocks.1.1.proj_in.lora_down.weight``)
in kohya tensor style are claimed here too, since ComfyUI also loads raw module paths.
"""

from __future__ import annotations

from ..types import AdapterLayer
from .base import LayerParts, build_pair, pair_style
from .keys import COMFY_PREFIXES, COMFY_STYLE, KOHYA_PREFIXES, KOHYA_STYLE, KeyStyle

__all__ = ["ComfyHandler"]


class ComfyHandler:
    """Claims ``diffusion_model.``/``text_encoders.`` layers and bare paths with lora_down/lora_up."""

    name = "comfy"
    default_style = COMFY_STYLE

    def claims(self, layer: str, parts: LayerParts) -> bool:
        if layer.startswith(COMFY_PREFIXES):
            return True
        return not layer.startswith(KOHYA_PREFIXES) and pair_style(parts) == KOHYA_STYLE

    def build(self, layer: str, parts: LayerParts) -> tuple[AdapterLayer, KeyStyle] | str:
        return build_pair(layer, parts)
