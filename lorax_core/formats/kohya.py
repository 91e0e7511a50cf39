"""kohya sd-scripts / A1111 / LyCORIS naming: ``lora_unet_<path_with_underscores>.lora_down.weight``.

Layer names carry a model-part prefix (``lora_unet_``, ``lora_te_``, ``lora_te1_``/``lora_te2_``
for SDXL's two text encoders, ``lora_transformer_``, ``lycoris_``) and the module path with dots
turned into underscores. Tensors: ``.lora_down.weight`` (r, in[, kh, kw]), ``.lora_up.weight``
(out, r[, 1, 1]), optional ``.alpha``. LoCon conv layers (1×1 and 3×3) use the same keys.
LyCORIS LoHa/LoKr/tucker/DoRA layers under these prefixes are claimed and reported as not
transferable by :func:`.base.build_pair`.
"""

from __future__ import annotations

from ..types import AdapterLayer
from .base import LayerParts, build_pair
from .keys import KOHYA_PREFIXES, KOHYA_STYLE, KeyStyle

__all__ = ["KohyaHandler"]


class KohyaHandler:
    """Claims every layer whose name starts with a kohya prefix."""

    name = "kohya"
    default_style = KOHYA_STYLE

    def claims(self, layer: str, parts: LayerParts) -> bool:
        return layer.startswith(KOHYA_PREFIXES)

    def build(self, layer: str, parts: LayerParts) -> tuple[AdapterLayer, KeyStyle] | str:
        return build_pair(layer, parts)
