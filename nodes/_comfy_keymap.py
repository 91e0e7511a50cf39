"""ComfyUI's LoRA key tables for the command line's ``--comfyui`` (host glue, like ``_host.py``).

``python -m lorax_core ... --comfyui PATH`` loads this file by its path (``lorax_core`` stays
host-free and never imports ComfyUI or this package). It derives ComfyUI's LoRA key map for a
model from the model file's *header*: ComfyUI detects the family from names, shapes and a few
small tensors, then builds the model (and, for a full checkpoint, its text encoder) on the
``meta`` device, so no weight is allocated — the same calls ComfyUI's own loaders make, minus
the weight loading.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

KeyMap = dict[str, str | tuple[str, object]]


def key_map_from_header(
    state: dict[str, torch.Tensor], metadata: dict[str, str], *, standalone: bool
) -> tuple[KeyMap, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] | None:
    """``({LoRA layer name: model key}, convert_lora)`` for a model, or ``None`` if ComfyUI does not know it.

    Args:
        state: the model file's tensors as ``meta`` tensors (small ones real), file key names.
        metadata: the file's string metadata (some families read it).
        standalone: ``True`` outside a running ComfyUI: ComfyUI is told to stay on the CPU before
            ``comfy.model_management`` is first imported (a CUDA build of torch on a machine without
            a GPU fails there otherwise). Never set it inside ComfyUI.

    Returns:
        Text-encoder targets under ``text_encoders.`` (the model-key namespace of
        ``lorax_core.modelio``); sliced targets (fused qkv) as ``(model key, slice)`` tuples.
    """
    # Imports happen here, not at module level, so the CPU flag above is set first.
    if standalone:
        from comfy.cli_args import args as comfy_args

        comfy_args.cpu = True
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_detection
    import comfy.utils

    # ComfyUI logs its detection steps (an unknown model is an ERROR record with the whole
    # derived config); the command line's contract is one stderr line per failure.
    previous_disable = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        config, unet_state, prefix = _detect(comfy.model_detection, state, metadata)
        renames: dict[str, str] = {}
        if config is None:
            config, renames = _detect_diffusers(comfy.model_detection, comfy.utils, state)
            unet_state, prefix = {}, ""
        if config is None:
            return None
        # Nothing is computed or loaded, so the dtype only has to be one every family accepts.
        config.set_inference_dtype(torch.float32, None)
        with torch.device("meta"):  # every tensor a constructor makes without naming a device
            model = config.get_model(unet_state, prefix, device="meta")
        key_map: KeyMap = {
            name: _renamed(target, renames) for name, target in comfy.lora.model_lora_keys_unet(model, {}).items()
        }
        if not renames:  # a diffusers UNet file holds no text encoder
            key_map.update(_text_encoder_key_map(comfy.lora, config, state))
    finally:
        logging.disable(previous_disable)
    return key_map, comfy.lora_convert.convert_lora


def _detect(
    model_detection: ModuleType, state: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[Any, dict[str, torch.Tensor], str]:
    """ComfyUI's model config for ``state``: as its checkpoint loader finds it, else as its diffusion-model loader does.

    Args:
        model_detection: ComfyUI's ``comfy.model_detection`` module (imported by the caller).

    Returns:
        ``(config or None, the state dict it was detected on, the UNet key prefix in it)``.
    """
    # Copies: detection pops marker keys (``scaled_fp8``) from the dict it is given.
    prefix = model_detection.unet_prefix_from_state_dict(state)
    config = model_detection.model_config_from_unet(dict(state), prefix, metadata=metadata)
    if config is not None:
        return config, state, prefix
    # A diffusion-model-only file: the weights carry no prefix (or an unusual one, stripped).
    stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)} or state
    return model_detection.model_config_from_unet(dict(stripped), "", metadata=metadata), stripped, ""


def _detect_diffusers(
    model_detection: ModuleType, utils: ModuleType, state: dict[str, torch.Tensor]
) -> tuple[Any, dict[str, str]]:
    """ComfyUI's config for a diffusers-layout UNet file (``diffusion_pytorch_model.safetensors``), as
    ``comfy.sd.load_diffusion_model`` detects it, and its key renames.

    ComfyUI loads such a file by renaming its keys to the original UNet layout
    (``comfy.utils.unet_to_diffusers``); the LoRA key map names that layout, while the pack reads
    the file under its own names. ``renames`` maps each ComfyUI model key
    (``diffusion_model.input_blocks.1.1.….weight``) back to the file's
    (``diffusion_model.down_blocks.0.attentions.0.….weight``, the ``lorax_core.modelio`` namespace).

    Returns:
        ``(config, renames)``, or ``(None, {})`` when the file is not a diffusers UNet ComfyUI knows.
    """
    config = model_detection.model_config_from_diffusers_unet(dict(state))
    if config is None:
        return None, {}
    renames = {
        f"diffusion_model.{ldm}": f"diffusion_model.{diffusers}"
        for diffusers, ldm in utils.unet_to_diffusers(config.unet_config).items()
        if diffusers in state
    }
    return config, renames


def _renamed(target: str | tuple[str, object], renames: dict[str, str]) -> str | tuple[str, object]:
    """A key-map target under the file's own key names (a ``(key, slice)`` target keeps its slice)."""
    if isinstance(target, tuple):
        return (renames.get(target[0], target[0]), *target[1:])  # type: ignore[return-value]
    return renames.get(target, target)


def _text_encoder_key_map(
    lora_module: ModuleType, config: Any, state: dict[str, torch.Tensor]
) -> dict[str, str | tuple[str, object]]:
    """ComfyUI's text-encoder LoRA keys for a full checkpoint, in the ``text_encoders.`` namespace.

    As ComfyUI's checkpoint loader does, the family's text encoder is built only when the file
    holds text-encoder weights; here on the ``meta`` device (its parameter names are all the key
    map needs). An empty map for diffusion-model-only files.

    Args:
        lora_module: ComfyUI's ``comfy.lora`` module (imported by the caller).
        config: the detected ComfyUI model config.
    """
    clip_state = config.process_clip_state_dict(dict(state))  # a copy: it renames keys in place
    target = config.clip_target(state_dict=state) if clip_state else None
    if target is None:
        return {}
    params = dict(target.params, dtype=torch.float32, device="meta", model_options={})
    with torch.device("meta"):
        encoder = target.clip(**params)
    out: dict[str, str | tuple[str, object]] = {}
    for name, key in lora_module.model_lora_keys_clip(encoder, {}).items():
        out[name] = (f"text_encoders.{key[0]}", key[1]) if isinstance(key, tuple) else f"text_encoders.{key}"
    return out
