"""ComfyUI's LoRA key tables for the command line's ``--comfyui`` (host glue, like ``_host.py``).

``python -m lorax_core ... --comfyui PATH`` runs this file as a separate program with the same
Python (``python nodes/_comfy_keymap.py --comfyui ROOT --model FILE [--lora FILE]``) and reads one
JSON answer from its standard output, so the ``lorax_core`` process never imports ComfyUI or this
package (the core stays host-free; ``tests/unit/test_import_boundary.py``).

It derives ComfyUI's LoRA key map for a model from the model file's *header*: ComfyUI detects the
family from names, shapes and a few small tensors, then builds the model (and, for a full
checkpoint, its text encoder) on the ``meta`` device, so no weight is allocated — the same calls
ComfyUI's own loaders make, minus the weight loading. With ``--lora`` it also reports how
ComfyUI's ``lora_convert.convert_lora`` renames that LoRA's tensors (computed on ``meta`` tensors
from the LoRA's header).

The answer (one line of JSON)::

    {"key_map": {LoRA layer name: model key | [model key, [dim, offset, size] | null, function name?]},
     "renames": {new tensor name: LoRA tensor name} | null,      # null: convert_lora keeps the names
     "extra": {new tensor name: {"dtype": str, "values": nested list}}}   # tensors convert_lora makes
    {"error": {"kind": "import" | "unrecognised" | "failed" | "format", "message": str}}
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

# ComfyUI's key map as it holds it (lorax_core.formats.resolve.KeyMap; this program runs on its own
# with ComfyUI's modules on its path, not the pack's, so it names the type itself).
KeyMap = dict[str, str | tuple[object, ...]]


def encode_target(target: str | tuple[object, ...]) -> str | list[object]:
    """One key-map entry as JSON: every kind ComfyUI's key maps hold.

    * ``"model key"``: the whole weight;
    * ``(model key, (dim, offset, size))``: a slice of a fused weight (Flux ``qkv``/``linear1``);
    * ``(model key, slice or None, function)``: a weight ComfyUI *converts* when it applies the
      LoRA (``comfy.utils.swap_scale_shift`` for the adaLN ``norm_out`` layers of Flux/SD3): the
      function travels by its name, ``[model key, slice or null, "swap_scale_shift"]``.
    """
    if not isinstance(target, tuple):
        return str(target)
    key, piece, *functions = target
    out: list[object] = [str(key), None if piece is None else list(piece)]  # type: ignore[call-overload]
    out.extend(None if f is None else getattr(f, "__name__", repr(f)) for f in functions)
    return out


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


# Tensors this small are read with their values: ComfyUI's detection of some model configs looks
# at values, not shapes (SD2's v-prediction test takes the std of a 320-wide norm bias; SDXL
# variants read scalar ``edm_vpred.sigma_*`` / ``v_pred`` markers). All such tensors are norms,
# biases and scalars — a few MB even for SDXL or Flux.
DETECTION_VALUE_LIMIT = 4096


def header_state_dict(
    path: Path, *, value_limit: int = DETECTION_VALUE_LIMIT
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors as ComfyUI's model detection sees them, read from the header only.

    Every tensor is a ``meta`` tensor of the stored shape and dtype (no storage), except tensors
    of at most ``value_limit`` elements, which are read (on CPU) because some model configs test
    their values.

    Returns:
        ``(state dict, string metadata)`` with the file's own key names.

    Raises:
        FormatError: missing, corrupt or truncated file (``lorax_core.formats.io.read_header``).
    """
    from safetensors import safe_open

    from lorax_core.errors import FormatError
    from lorax_core.formats.io import SAFETENSORS_DTYPES, read_header

    if path.suffix.lower() == ".gguf":
        return _gguf_state_dict(path, value_limit)
    header, metadata = read_header(path)
    state: dict[str, torch.Tensor] = {}
    small: list[str] = []
    for name, entry in header.items():
        shape = tuple(int(d) for d in entry["shape"])  # type: ignore[union-attr]
        dtype = SAFETENSORS_DTYPES[str(entry["dtype"])]  # read_header checked the name
        state[name] = torch.empty(shape, dtype=dtype, device="meta")
        if math.prod(shape) <= value_limit:
            small.append(name)
    if small:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                for name in small:
                    state[name] = fh.get_tensor(name)
        except Exception as exc:  # safetensors' own SafetensorError
            raise FormatError(f"{path}: safetensors could not read the file ({exc}); it may be corrupt.") from None
    return state, metadata


def _gguf_state_dict(path: Path, value_limit: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A GGUF diffusion model as ComfyUI-GGUF hands it to ComfyUI's detection: its tensor names and shapes.

    ``meta`` float32 tensors (the dequantised shapes), the small ones read with their values
    (``lorax_core.gguf_model.GGUFWeights``, the gguf package's dequantisation).
    """
    from lorax_core.gguf_model import GGUFWeights

    weights = GGUFWeights(path)
    state: dict[str, torch.Tensor] = {}
    for name, shape in weights.file_shapes.items():
        key = f"diffusion_model.{name}"  # GGUFWeights' model-key namespace for a bare diffusion-model name
        small = math.prod(shape) <= value_limit
        state[name] = weights.get(key) if small else torch.empty(shape, dtype=torch.float32, device="meta")
    return state, {}


def lora_renames(
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], lora: Path
) -> tuple[dict[str, str] | None, dict[str, dict[str, object]]]:
    """How ``convert`` (ComfyUI's ``convert_lora``) renames the tensors of the LoRA file ``lora``.

    ``convert`` runs on the LoRA's header as ``meta`` tensors (no factor is read): an output
    tensor that *is* an input tensor was renamed; any other output is a tensor ``convert`` made
    (BFL control LoRAs get a small ``reshape_weight``), returned with its values.

    Returns:
        ``(renames or None when every name is kept, extra tensors)``.

    Raises:
        FormatError: the LoRA file is unreadable.
    """
    state, _ = header_state_dict(lora, value_limit=0)
    names = {id(tensor): name for name, tensor in state.items()}
    renames: dict[str, str] = {}
    extra: dict[str, dict[str, object]] = {}
    for new, tensor in convert(dict(state)).items():
        old = names.get(id(tensor))
        if old is not None:
            renames[new] = old
        elif tensor.is_meta:  # a converter that computed from a factor's values: not expressible as a rename
            raise RuntimeError(f"ComfyUI's convert_lora derived {new!r} from tensor values")
        else:
            extra[new] = {"dtype": str(tensor.dtype).removeprefix("torch."), "values": tensor.tolist()}
    if not extra and renames == {name: name for name in state}:
        return None, {}
    return renames, extra


def _answer(args: argparse.Namespace) -> dict[str, object]:
    """The JSON answer for one ``--comfyui`` request (see the module docstring)."""
    from lorax_core.errors import LoraxError

    try:
        state, metadata = header_state_dict(args.model)
        try:
            found = key_map_from_header(state, metadata, standalone=True)
        except ImportError as exc:  # ComfyUI's own dependencies (or ComfyUI itself) missing from this Python
            return {"error": {"kind": "import", "message": f"{type(exc).__name__}: {exc}"}}
        if found is None:
            return {"error": {"kind": "unrecognised", "message": ""}}
        key_map, convert = found
        renames, extra = lora_renames(convert, args.lora) if args.lora is not None else (None, {})
    except LoraxError as exc:
        return {"error": {"kind": "format", "message": str(exc)}}
    except Exception as exc:  # ComfyUI raises plain KeyError/RuntimeError on layouts it half-recognises
        return {"error": {"kind": "failed", "message": f"{type(exc).__name__}: {exc}"}}
    return {
        "key_map": {name: encode_target(t) for name, t in key_map.items()},
        "renames": renames,
        "extra": extra,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Answer one request on standard output (status 0 even for an error answer; 2 for bad arguments)."""
    parser = argparse.ArgumentParser(description="ComfyUI's LoRA key map for a model file, as JSON (for --comfyui).")
    parser.add_argument("--comfyui", type=Path, required=True, help="ComfyUI's root folder")
    parser.add_argument("--model", type=Path, required=True, help="the base model file")
    parser.add_argument("--lora", type=Path, default=None, help="a LoRA file whose renames to report")
    args = parser.parse_args(argv)
    if str(args.comfyui) not in sys.path:
        sys.path.insert(1, str(args.comfyui))
    # ComfyUI may print while it is imported; only the answer goes to standard output.
    answer_stream, sys.stdout = sys.stdout, sys.stderr
    try:
        answer = _answer(args)
    finally:
        sys.stdout = answer_stream
    answer_stream.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    # Run as a program: this folder (the pack's ``nodes``, whose modules would shadow others) is
    # replaced on the import path by the pack root, so ``lorax_core`` is importable.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    sys.exit(main())
