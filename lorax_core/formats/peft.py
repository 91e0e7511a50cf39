"""diffusers / PEFT naming: ``<prefix><module path>.lora_A.weight`` (down, (r, in)) and
``.lora_B.weight`` (up, (out, r)).

Prefixes ``unet.``, ``transformer.``, ``text_encoder.``, ``text_encoder_2.`` and
``base_model.model.`` are kept in the layer name (so a file is written back with the same keys);
:mod:`.resolve` strips them. PEFT's adapter name (``.lora_A.default.weight``) and the older
diffusers attention-processor forms (``.lora.down.weight``, ``_lora.down.weight``,
``.lora_linear_layer.down.weight``) are read too. PEFT keeps ``lora_alpha`` in
``adapter_config.json``, not in the tensors: without an ``.alpha`` tensor the scale is 1, which
is what diffusers and ComfyUI assume for such files.
"""

from __future__ import annotations

from ..types import AdapterLayer
from .base import LayerParts, build_pair, pair_style
from .keys import KOHYA_STYLE, PEFT_PREFIXES, PEFT_STYLE, KeyStyle

__all__ = ["PeftHandler"]


class PeftHandler:
    """Claims layers spelled with lora_A/lora_B (or older diffusers pairs), or under a PEFT prefix."""

    name = "peft"
    default_style = PEFT_STYLE

    def claims(self, layer: str, parts: LayerParts) -> bool:
        style = pair_style(parts)
        if style is not None:
            return style != KOHYA_STYLE
        return layer.startswith(PEFT_PREFIXES)

    def build(self, layer: str, parts: LayerParts) -> tuple[AdapterLayer, KeyStyle] | str:
        return build_pair(layer, parts)
