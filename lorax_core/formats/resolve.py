"""Resolve a LoRA file's layer names to model keys (and back, for writing).

Model keys are the namespace of :mod:`lorax_core.modelio`: ``diffusion_model.<path>.weight`` and
``text_encoders.<encoder>.<path>.weight``. Inside ComfyUI (or with ``--comfyui PATH``) the host's
key map decides; without it we resolve, in order:

1. ComfyUI-native names: ``<layer>.weight`` is a model key (``diffusion_model.…``, ``text_encoders.…``);
2. PEFT/diffusers prefixes stripped (``unet.``, ``transformer.``, ``base_model.model.`` →
   ``diffusion_model.``; ``text_encoder.`` → ``text_encoders.clip_l.transformer.``);
3. bare module paths (``input_blocks.1.1.proj_in`` → ``diffusion_model.input_blocks.1.1.proj_in.weight``);
4. kohya names against the model's own keys, dots ↔ underscores (``lora_unet_`` ↔
   ``diffusion_model.``, ``lora_te_``/``lora_te1_``/``lora_te2_`` ↔ the text encoders).

Diffusers block names (``down_blocks.0.attentions.0…``) follow a different module layout that only
ComfyUI's per-family tables translate; such layers are reported with a pointer to ``--comfyui``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .keys import DIFFUSERS_BLOCK_MARKERS, KOHYA_TEXT_ENCODERS

__all__ = ["NEEDS_COMFYUI", "KeyMap", "kohya_index", "layer_name_for", "resolve_layers"]

KeyMap = Mapping[str, "str | tuple[str, object]"]
"""ComfyUI's ``model_lora_keys_unet``/``model_lora_keys_clip`` output: {LoRA prefix: model key or
(model key, slice)}."""

_PEFT_TO_MODEL: tuple[tuple[str, str], ...] = (
    ("base_model.model.", "diffusion_model."),
    ("unet.", "diffusion_model."),
    ("transformer.", "diffusion_model."),
    ("text_encoder.", "text_encoders.clip_l.transformer."),
    ("text_encoder_2.", "text_encoders.clip_g.transformer."),
)
_UNET_KOHYA_PREFIXES: tuple[str, ...] = ("lora_unet_", "lora_transformer_", "lycoris_")
NEEDS_COMFYUI = (
    "diffusers-style block name: only ComfyUI's per-family key tables map it onto this model's layers; "
    "pass --comfyui PATH (a ComfyUI install) to the command, or load the LoRA inside ComfyUI"
)


def kohya_index(model_keys: Iterable[str]) -> tuple[dict[str, str], set[str]]:
    """Map kohya layer names to model keys by turning dots into underscores.

    Returns:
        ``({kohya name: model key}, ambiguous names)``; an ambiguous name is one that two model
        keys spell the same way once dots become underscores (never resolved by guessing).
    """
    index: dict[str, str] = {}
    ambiguous: set[str] = set()
    for key in model_keys:
        for name in _kohya_names(key):
            if name in index and index[name] != key:
                ambiguous.add(name)
            index.setdefault(name, key)
    for name in ambiguous:
        del index[name]
    return index, ambiguous


def _kohya_names(model_key: str) -> list[str]:
    if not model_key.endswith(".weight"):
        return []
    path = model_key[: -len(".weight")]
    if path.startswith("diffusion_model."):
        flat = path[len("diffusion_model.") :].replace(".", "_")
        return [prefix + flat for prefix in _UNET_KOHYA_PREFIXES]
    names = []
    for prefix, encoders in KOHYA_TEXT_ENCODERS.items():
        for enc in encoders:
            head = f"text_encoders.{enc}.transformer."
            if path.startswith(head):
                names.append(prefix + path[len(head) :].replace(".", "_"))
    return names


def resolve_layers(
    layer_names: Iterable[str],
    model_keys: Iterable[str],
    key_map: KeyMap | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """Resolve LoRA layer names to the model keys they patch.

    Args:
        layer_names: the LoRA file's layer names.
        model_keys: every key of the (source) model, in the :mod:`lorax_core.modelio` namespace.
        key_map: ComfyUI's key map, when available; tried first. Sliced targets (fused qkv
            weights) are reported as unresolved.

    Returns:
        ``(resolved, unresolved)``: ``{layer name: model key}`` and ``{layer name: reason}``.
        Two layer names resolving to the same model key: the second is unresolved.
    """
    keys = set(model_keys)
    index, ambiguous = kohya_index(keys)
    resolved: dict[str, str] = {}
    unresolved: dict[str, str] = {}
    taken: dict[str, str] = {}
    for name in layer_names:
        key, reason = _resolve_one(name, keys, index, ambiguous, key_map)
        if key is None:
            unresolved[name] = reason
        elif key in taken:
            unresolved[name] = f"patches {key}, which layer {taken[key]} already patches; duplicate layer"
        else:
            resolved[name] = key
            taken[key] = name
    return resolved, unresolved


def _resolve_one(
    name: str, keys: set[str], index: Mapping[str, str], ambiguous: set[str], key_map: KeyMap | None
) -> tuple[str | None, str]:
    if key_map is not None and name in key_map:
        target = key_map[name]
        if isinstance(target, tuple):
            return None, "targets a slice of a fused weight (e.g. Flux qkv); fused weight slices are not supported yet"
        if target in keys:
            return target, ""
        return None, f"ComfyUI maps it to {target}, which the source model does not have"
    candidates = [f"{name}.weight"]
    for prefix, model_prefix in _PEFT_TO_MODEL:
        if name.startswith(prefix):
            candidates.append(f"{model_prefix}{name[len(prefix) :]}.weight")
    candidates.append(f"diffusion_model.{name}.weight")
    for candidate in candidates:
        if candidate in keys:
            return candidate, ""
    if name in index:
        return index[name], ""
    if name in ambiguous:
        return None, "its kohya name matches several model weights once dots become underscores; ambiguous"
    if any(marker in name for marker in DIFFUSERS_BLOCK_MARKERS):
        return None, NEEDS_COMFYUI
    return None, "no weight of that name in the source model (wrong base model family, or a LoRA for another part)"


def layer_name_for(model_key: str, fmt: str) -> str:
    """A layer name for ``model_key`` in format ``fmt``, for layers the source file did not name.

    kohya gets ``lora_unet_<path_with_underscores>`` for diffusion-model keys; every other case
    gets the ComfyUI-native name (the model key without ``.weight``), which ComfyUI loads for any
    family and A1111/Forge load for SD-style models.
    """
    path = model_key[: -len(".weight")] if model_key.endswith(".weight") else model_key
    if fmt == "kohya" and path.startswith("diffusion_model."):
        return "lora_unet_" + path[len("diffusion_model.") :].replace(".", "_")
    return path
