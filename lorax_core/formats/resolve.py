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

Every step (the key map too) tries each spelling of :func:`name_spellings` — the name as written,
then without PEFT's ``base_model.model.``, with transformers-5 CLIP names given back their
``text_model.``, and with PEFT attention names in ComfyUI's ``processor.`` form.

Diffusers block names (``down_blocks.0.attentions.0…``) follow a different module layout that only
ComfyUI's per-family tables translate; without a key map such layers are reported with a pointer
to ``--comfyui``, with one as unknown to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..slices import slice_from_comfy
from .keys import (
    DIFFUSERS_ATTENTION_SPELLINGS,
    DIFFUSERS_BLOCK_MARKERS,
    DIFFUSERS_COMPONENTS,
    KOHYA_TEXT_ENCODERS,
    PEFT_WRAPPER,
    TEXT_MODEL_SPELLINGS,
)

__all__ = [
    "NEEDS_COMFYUI",
    "NOT_IN_KEY_MAP",
    "KeyMap",
    "kohya_index",
    "layer_name_for",
    "name_spellings",
    "resolve_layers",
]

KeyMap = Mapping[str, "str | tuple[object, ...]"]
"""ComfyUI's ``model_lora_keys_unet``/``model_lora_keys_clip`` output: {LoRA prefix: model key,
(model key, slice) or (model key, slice or None, conversion function)}. The one definition of the
type in the core (the CLI's ``--comfyui`` answer and the nodes use it)."""

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
NOT_IN_KEY_MAP = (
    "neither ComfyUI's key map for this model nor its weight names know this layer (in any spelling diffusers, "
    "PEFT or kohya give it): the LoRA was made for another model family or another part of the model"
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
        key_map: ComfyUI's key map, when available; tried first. A sliced target (part of a
            fused weight such as Flux's qkv) resolves to the slice's canonical key
            ``<model key>[<dim>:<offset>:<size>]`` (:mod:`lorax_core.slices`). A model file
            serves such a key once asked for it (``SafetensorsWeights.shape``/``get``; a
            *target* file needs ``add_slices`` before the transfer pairs layers); the node's
            ``PatcherWeights`` lists every slice of ComfyUI's key map.

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
    spellings = name_spellings(name)
    mapped = next((s for s in spellings if s in key_map), None) if key_map is not None else None
    if key_map is not None and mapped is not None:
        target = key_map[mapped]
        if isinstance(target, tuple) and len(target) > 2 and target[2] is not None:
            return None, _converted_reason(target)
        if isinstance(target, tuple):
            return _resolve_slice(target, keys)
        if target in keys:
            return target, ""
        return None, f"ComfyUI maps it to {target}, which the source model does not have"
    candidates = []
    for spelling in spellings:
        candidates.append(f"{spelling}.weight")
        for prefix, model_prefix in _PEFT_TO_MODEL:
            if spelling.startswith(prefix):
                candidates.append(f"{model_prefix}{spelling[len(prefix) :]}.weight")
        candidates.append(f"diffusion_model.{spelling}.weight")
    for candidate in candidates:
        if candidate in keys:
            return candidate, ""
    indexed = next((s for s in spellings if s in index), None)
    if indexed is not None:
        return index[indexed], ""
    if name in ambiguous:
        return None, "its kohya name matches several model weights once dots become underscores; ambiguous"
    if key_map is not None:
        return None, NOT_IN_KEY_MAP
    if any(marker in name for marker in DIFFUSERS_BLOCK_MARKERS):
        return None, NEEDS_COMFYUI
    return None, "no weight of that name in the source model (wrong base model family, or a LoRA for another part)"


def name_spellings(name: str) -> list[str]:
    """``name`` and the other spellings the ecosystem's tools give the same module, ``name`` first.

    * PEFT's model wrapper dropped: ``base_model.model.X`` → ``X``, ``unet.base_model.model.X`` → ``unet.X``;
    * transformers-5 CLIP names with the ``text_model`` wrapper put back:
      ``text_encoder.encoder.layers.0…`` → ``text_encoder.text_model.encoder.layers.0…``;
    * PEFT's attention names in ComfyUI's attention-processor spelling: ``…attn1.to_q`` →
      ``…attn1.processor.to_q``, ``…to_out.0`` → ``…processor.to_out`` (the only spelling
      ComfyUI's ``model_lora_keys_unet`` lists for diffusers UNet attention layers).

    Spelling tables: :data:`~.keys.TEXT_MODEL_SPELLINGS`, :data:`~.keys.DIFFUSERS_ATTENTION_SPELLINGS`.
    """
    forms = [name]
    component, _, rest = name.partition(".")
    if name.startswith(PEFT_WRAPPER):
        forms.append(name[len(PEFT_WRAPPER) :])
    elif component in DIFFUSERS_COMPONENTS and rest.startswith(PEFT_WRAPPER):
        forms.append(f"{component}.{rest[len(PEFT_WRAPPER) :]}")
    for form in list(forms):
        forms.extend(classic + form[len(new) :] for new, classic in TEXT_MODEL_SPELLINGS if form.startswith(new))
    for form in list(forms):
        forms.extend(form[: -len(tail)] + comfy for tail, comfy in DIFFUSERS_ATTENTION_SPELLINGS if form.endswith(tail))
    return forms


def _converted_reason(target: tuple[object, ...]) -> str:
    """Why a key-map entry ``(model key, slice, function)`` is not transferred.

    ComfyUI applies such a layer's ΔW through ``function`` (``swap_scale_shift``, which swaps the
    shift and scale halves of the adaLN ``norm_out`` rows of Flux/SD3), so the LoRA's factors
    live in a row order the model weight does not have; the subspaces would be paired wrongly.
    """
    function = target[2] if isinstance(target[2], str) else getattr(target[2], "__name__", repr(target[2]))
    return (
        f"ComfyUI converts this layer's update ({function}) before adding it to {target[0]}, so its factors "
        "do not lie in the weight's row order; converted layers are not transferred"
    )


def _resolve_slice(target: tuple[str, object], keys: set[str]) -> tuple[str | None, str]:
    """A key-map entry ``(model key, (dim, offset, size))`` as the slice's canonical key (:mod:`..slices`).

    Whether the slice fits the weight's shape is checked by the weight sources, which know shapes.
    """
    base, spec = target[0], target[1] if len(target) > 1 else None
    piece = slice_from_comfy(base, spec)
    if piece is None:
        return None, f"ComfyUI maps it to part {spec!r} of {base}, a slice description this version cannot read"
    if base not in keys:
        return None, f"ComfyUI maps it to a slice of {base}, which the source model does not have"
    return piece.key, ""


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
