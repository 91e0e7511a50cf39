"""Guess the base-model family of a LoRA or model file from its metadata, key names and shapes.

Used by ``python -m lorax_core inspect`` only; a guess, never a gate. Order of evidence:
kohya's ``ss_base_model_version`` and ``modelspec.architecture`` metadata, then key names
(Flux's ``double_blocks``/``single_blocks``, SDXL's second text encoder), then the width of the
cross-attention context (``attn2.to_k`` input: 768 SD1.x, 1024 SD2.x, 2048 SDXL).
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["FAMILIES", "guess_family"]

FAMILIES: tuple[str, ...] = ("sd15", "sd2", "sdxl", "flux", "unknown")
_METADATA_HINTS: tuple[tuple[str, str], ...] = (
    ("sdxl", "sdxl"),
    ("stable-diffusion-xl", "sdxl"),
    ("sd_v1", "sd15"),
    ("stable-diffusion-v1", "sd15"),
    ("sd_v2", "sd2"),
    ("stable-diffusion-v2", "sd2"),
    ("flux", "flux"),
)
_KEY_HINTS: tuple[tuple[str, str], ...] = (
    ("double_blocks", "flux"),
    ("single_blocks", "flux"),
    ("lora_te2_", "sdxl"),
    ("text_encoder_2.", "sdxl"),
    ("conditioner.embedders.1.", "sdxl"),
)
_CONTEXT_DIMS = {768: "sd15", 1024: "sd2", 2048: "sdxl"}


def guess_family(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None = None) -> str:
    """One of :data:`FAMILIES` for a file's ``{tensor name: shape}`` and metadata.

    For LoRA files the cross-attention width is read from the ``down`` factor of ``attn2.to_k``
    (shape ``(r, context)``); for models from the weight itself (``(out, context)``).
    """
    meta = metadata or {}
    for field in ("ss_base_model_version", "modelspec.architecture"):
        value = meta.get(field, "").lower()
        for hint, family in _METADATA_HINTS:
            if hint in value:
                return family
    for hint, family in _KEY_HINTS:
        if any(hint in key for key in shapes):
            return family
    for key, shape in shapes.items():
        flat = key.replace(".", "_")
        if "attn2_to_k" in flat and len(shape) == 2 and not flat.endswith(("up_weight", "lora_B_weight")):
            family = _CONTEXT_DIMS.get(int(shape[1]))
            if family is not None:
                return family
    return "unknown"
