"""LoRA file formats: a registry of small handlers, and the read/write entry points.

Reading groups a file's keys into layers by tensor suffix (:mod:`.keys`), then asks the
handlers in :data:`HANDLERS` order which one claims each layer; the first claim wins. A layer
no handler claims, and every key with no known suffix, goes to :attr:`LoraFile.unsupported`
with a reason — nothing is dropped silently. If no handler claims anything, the file is not a
LoRA in any format we know and :class:`~lorax_core.errors.FormatError` lists the formats tried
and some of the keys.

Writing spells each layer in the style it was read in (so kohya names stay kohya and PEFT stays
``lora_A``/``lora_B``), or in ComfyUI-native style on request; see docs/FORMATS.md.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import FormatError
from ..types import AdapterLayer, LoraFactors, LoraXFactors
from ..version import TOOL_NAME, TOOL_VERSION
from .base import FormatHandler, LoraFile, layer_tensors
from .comfy import ComfyHandler
from .io import load_tensors, read_header, save_tensors
from .keys import ALPHA_SUFFIX, COMFY_STYLE, KOHYA_STYLE, PEFT_STYLE, KeyStyle, split_key
from .kohya import KohyaHandler
from .lorax import FORMAT_METADATA, LoraxHandler, lorax_tensors
from .peft import PeftHandler, metadata_alphas, rewrite_adapter_metadata

__all__ = [
    "HANDLERS",
    "TOOL_NAME",
    "TOOL_VERSION",
    "FormatHandler",
    "KeyStyle",
    "LoraFile",
    "looks_like_lora",
    "parse_lora",
    "read_keys",
    "read_lora",
    "write_lora",
]

# Order matters only for layers two handlers could both claim: LoRA-X cores first, then the
# prefix-based styles, then PEFT (suffix-based).
HANDLERS: tuple[FormatHandler, ...] = (LoraxHandler(), KohyaHandler(), ComfyHandler(), PeftHandler())
_STYLES: dict[str, KeyStyle] = {"kohya": KOHYA_STYLE, "comfy": COMFY_STYLE, "peft": PEFT_STYLE}


def looks_like_lora(keys: Iterable[str]) -> bool:
    """Whether any key has a LoRA/LyCORIS/LoRA-X tensor suffix (a cheap test on header names)."""
    return any(split_key(k) is not None for k in keys)


def parse_lora(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *, source: str = "<memory>"
) -> LoraFile:
    """Parse a ``{key: tensor}`` LoRA state dict into a :class:`LoraFile`.

    Args:
        tensors: the file's tensors (any dtype/device; kept as they are).
        metadata: the file's string metadata.
        source: how to name the input in error messages (a path).

    Raises:
        FormatError: no handler claims any layer (lists the formats tried and a few keys).
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unsupported: dict[str, str] = {}
    for key, tensor in tensors.items():
        split = split_key(key)
        if split is None:
            unsupported[key] = "unrecognised tensor key (not part of any LoRA format we read); not transferable"
            continue
        layer, suffix = split
        groups.setdefault(layer, {})[suffix] = tensor

    claimed: dict[str, FormatHandler] = {}
    for layer, parts in groups.items():
        for handler in HANDLERS:
            if handler.claims(layer, parts):
                claimed[layer] = handler
                break
        else:
            unsupported[layer] = "no LoRA format claims this layer name; not transferable"
    if not claimed:
        tried = ", ".join(h.name for h in HANDLERS)
        sample = ", ".join(sorted(tensors)[:5]) or "(the file has no tensors)"
        raise FormatError(
            f"{source}: not a LoRA file in any format we read (tried {tried}); some keys: {sample}. "
            "See docs/FORMATS.md for the supported key styles."
        )

    layers: dict[str, AdapterLayer] = {}
    styles: dict[str, KeyStyle] = {}
    for layer, handler in claimed.items():
        built = handler.build(layer, groups[layer])
        if isinstance(built, str):
            unsupported[layer] = built
        else:
            layers[layer], styles[layer] = built
    # diffusers applies lora_alpha / r from the file's lora_adapter_metadata to PEFT layers
    # without an .alpha tensor; read them at that scale (docs/FORMATS.md, "Scale").
    alphaless = {
        name: layer
        for name, layer in layers.items()
        if claimed[name].name == PeftHandler.name and isinstance(layer, LoraFactors) and layer.alpha is None
    }
    for name, alpha in metadata_alphas(alphaless, metadata or {}).items():
        layers[name] = replace(alphaless[name], alpha=alpha)  # type: ignore[type-var]
    counts = Counter(h.name for h in claimed.values())
    return LoraFile(
        format=counts.most_common(1)[0][0],
        layers=layers,
        unsupported=unsupported,
        metadata=dict(metadata or {}),
        styles=styles,
        layer_formats={layer: h.name for layer, h in claimed.items()},
    )


def read_lora(
    path: str | os.PathLike[str],
    *,
    key_transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> LoraFile:
    """Read a LoRA ``.safetensors`` file.

    Args:
        path: the file. Pickle files are refused (:class:`~lorax_core.errors.UnsafeFileError`).
        key_transform: optional rewrite of the raw state dict before parsing (the CLI passes
            ComfyUI's ``lora_convert.convert_lora`` when ``--comfyui`` is given).

    Returns:
        A :class:`LoraFile`; tensors stay in the file's dtype, on CPU.

    Raises:
        FormatError: unreadable/corrupt file, or no format claims its keys.
    """
    p = Path(path)
    tensors, metadata = load_tensors(p)
    if key_transform is not None:
        tensors = key_transform(tensors)
    lora = parse_lora(tensors, metadata, source=str(p))
    lora.path = p
    return lora


def read_keys(path: str | os.PathLike[str]) -> tuple[list[str], dict[str, tuple[int, ...]], dict[str, str]]:
    """The tensor names, shapes and metadata of a safetensors file, reading only its header."""
    header, metadata = read_header(path)
    shapes = {name: tuple(int(d) for d in entry["shape"]) for name, entry in header.items()}  # type: ignore[union-attr]
    return list(header), shapes, metadata


def write_lora(
    path: str | os.PathLike[str],
    layers: Mapping[str, AdapterLayer],
    *,
    style: LoraFile | str = "comfy",
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    extra_files: Mapping[str | os.PathLike[str], str] | None = None,
) -> Path:
    """Write layers as a ``.safetensors`` LoRA, atomically, with optional text files alongside.

    Args:
        path: the output file (must end in ``.safetensors``; parent folder must exist).
        layers: ``{layer name: LoraFactors | LoraXFactors}``. Names are written as given, so they
            must already be in the target style (e.g. ``lora_unet_…`` for kohya,
            ``diffusion_model.…`` for comfy). LoRA-X layers are written in the LoRA-X format.
        style: a :class:`LoraFile` (each layer keeps the key style it was read with; layers it
            does not know use its format's default), or ``"kohya"``, ``"comfy"``, ``"peft"``.
        metadata: string metadata; the tool name/version are added. A diffusers
            ``lora_adapter_metadata`` is rewritten to describe the written ranks with
            ``lora_alpha = r``, or dropped when a layer is written with an ``.alpha`` tensor
            (:func:`~lorax_core.formats.peft.rewrite_adapter_metadata`).
        overwrite: replace an existing file (otherwise :class:`OutputExistsError`).
        extra_files: ``{path: text}`` written together with the LoRA — both or neither — e.g. its
            JSON report (:func:`~lorax_core.formats.io.save_tensors`).

    Scale: LoRA layers are written with ``alpha = rank`` (or no alpha in PEFT style) and any
    other ``alpha / rank`` folded into ``up``, so every loader computes the same ΔW (when the
    fold would overflow the factors' dtype, see :func:`~lorax_core.formats.base.pair_tensors`).

    Raises:
        FormatError: unknown style name, a name collision, or a bad path
            (:class:`~lorax_core.errors.OutputError`, also for a failed write).
        OutputExistsError: an output exists and ``overwrite`` is false.
        NonFiniteError: a layer holds NaN or Inf; nothing is written.
    """
    if isinstance(style, LoraFile):
        per_layer, default = style.styles, _STYLES.get(style.format, COMFY_STYLE)
    elif style in _STYLES:
        per_layer, default = {}, _STYLES[style]
    else:
        raise FormatError(f"unknown output style {style!r}; use one of {', '.join(_STYLES)} or a source LoraFile.")
    from ..lycoris import LycorisLayer  # lorax_core.lycoris reads this package's key tables

    tensors: dict[str, torch.Tensor] = {}
    has_lorax = False
    alphaless: dict[str, int] = {}  # {layer: rank} written without .alpha (scale folded into up)
    with_alpha = False
    for name, layer in layers.items():
        if isinstance(layer, LoraXFactors):
            part = lorax_tensors(name, layer)
            has_lorax = True
        elif isinstance(layer, LoraFactors):
            layer_style = per_layer.get(name, default)
            if layer_style.down.startswith(".lorax"):
                layer_style = COMFY_STYLE
            part = layer_tensors(name, layer, layer_style)
            if f"{name}{ALPHA_SUFFIX}" in part or isinstance(layer, LycorisLayer):
                with_alpha = True
            else:
                alphaless[name] = layer.rank
        else:
            raise FormatError(f"layer {name!r}: cannot write a {type(layer).__name__}; expected LoraFactors.")
        clash = tensors.keys() & part.keys()
        if clash:
            raise FormatError(f"layer {name!r}: key {sorted(clash)[0]!r} is written twice; layer names must be unique.")
        tensors.update(part)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    # A copied lora_adapter_metadata would describe the source's ranks and alpha (diffusers then
    # refuses the file, or rescales it); describe what is written instead.
    meta = rewrite_adapter_metadata(meta, alphaless, has_alpha_layers=with_alpha or has_lorax)
    meta.setdefault("lorax.tool", TOOL_NAME)
    meta.setdefault("lorax.tool_version", TOOL_VERSION)
    if has_lorax:
        meta.update(FORMAT_METADATA)
    return save_tensors(path, tensors, meta, overwrite=overwrite, extra_files=extra_files)
