"""The transfer nodes' ComfyUI glue (refine and training have theirs in ``_refine_host``/``_train_host``).

What lives here (ComfyUI's own machinery, reused rather than rewritten):

* model weights out of a ``ModelPatcher`` as a lazy :class:`~lorax_core.types.WeightSource`
  (:class:`PatcherWeights`: ``get_key_patches`` + ``convert_fn``, float32, one tensor at a time);
* the source model file as a lazy handle (:class:`SourceModel`, over ``lorax_core.modelio``);
* ComfyUI's LoRA key maps (``comfy.lora.model_lora_keys_unet``/``model_lora_keys_clip``, always
  with a fresh dict) and ``comfy.lora_convert.convert_lora``, feeding ``lorax_core.formats``;
* applying a LoRA state dict: ``comfy.lora.load_lora`` → ``clone()`` + ``add_patches``;
* ``folder_paths`` lookups, the output folder of the save node;
* the progress callback (``comfy.utils.ProgressBar`` + ``throw_exception_if_processing_interrupted``),
  the compute device (``comfy.model_management``) and the subspace cache (memory in front of a
  disk cache in ComfyUI's user folder, :func:`subspace_cache`).

Model-key namespace: ``diffusion_model.<path>.weight`` for the diffusion model (ComfyUI's own
names) and ``text_encoders.<ComfyUI CLIP key>`` for text encoders, the namespace of
``lorax_core.modelio`` and of ComfyUI-native LoRA files (``text_encoders.clip_l.…``).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import comfy.lora
import comfy.lora_convert
import comfy.model_detection
import comfy.model_management
import comfy.supported_models
import comfy.utils
import folder_paths
import torch
from comfy.weight_adapter import LoRAAdapter

from ..lorax_core.cache import DiskCache, MemoryCache, NullCache, SubspaceCache
from ..lorax_core.errors import (
    CacheError,
    FormatError,
    IncompatibleBaseError,
    OptionError,
    OutputError,
    OutputExistsError,
)
from ..lorax_core.formats import LoraFile, parse_lora, read_lora, write_lora
from ..lorax_core.formats.base import layer_tensors
from ..lorax_core.formats.keys import COMFY_STYLE, KOHYA_TEXT_ENCODERS, split_key
from ..lorax_core.matching import depth_mismatches
from ..lorax_core.modelio import FileWeights, open_model
from ..lorax_core.pipeline import TransferPlan, output_names
from ..lorax_core.pipeline import plan_transfer as core_plan_transfer
from ..lorax_core.slices import WeightSlice, parse_slice_key, slice_from_comfy
from ..lorax_core.types import LoraFactors, TransferResult, flat_shape

UNET_PREFIX = "diffusion_model."
TE_PREFIX = "text_encoders."
SOURCE_FOLDERS = ("checkpoints", "diffusion_models")
SAVE_SUBFOLDER = "lorax"
# Subspaces of base weights are reused across runs in one ComfyUI process (the second transfer
# onto the same target costs no SVD). 1 GiB holds every R=320 basis of an SD1.5 UNet twice over.
# Behind it, a DiskCache keeps them across restarts (bounded by its own default, 8 GiB).
CACHE_BYTES = 1 << 30
# ComfyUI's *system* user folder ``<user>/__lorax``: the ``__`` prefix keeps it out of the
# /userdata HTTP API (a plain ``<user>/lorax`` would be reachable as user "lorax" with --multi-user).
CACHE_SYSTEM_USER = "lorax"
CACHE_SUBFOLDER = "subspace-cache"
# LoRA layer names that address a text encoder (kohya, ComfyUI-native, PEFT/diffusers).
TE_LAYER_PREFIXES = (*KOHYA_TEXT_ENCODERS, TE_PREFIX, "text_encoder.", "text_encoder_2.")
TE_NEEDS_CLIP = "text-encoder layer: connect the target model's CLIP to the node to transfer it"

_cache: tuple[Path, MemoryCache] | None = None


def subspace_cache_dir() -> Path:
    """Where the node keeps subspaces on disk: ``<ComfyUI user folder>/__lorax/subspace-cache``.

    Follows ``--user-directory``. Hosts older than ``folder_paths.get_system_user_directory``
    (present in v0.3.75) get ``<user folder>/lorax/subspace-cache``. Nothing is created here.
    """
    system_dir = getattr(folder_paths, "get_system_user_directory", None)
    if system_dir is not None:
        return Path(system_dir(CACHE_SYSTEM_USER)) / CACHE_SUBFOLDER
    return Path(folder_paths.get_user_directory()) / CACHE_SYSTEM_USER / CACHE_SUBFOLDER


def subspace_cache(use_disk: bool) -> SubspaceCache:
    """The subspace cache for a node run: the ``use_cache`` widget maps to ``use_disk``.

    ``use_disk=True``: a process-wide :class:`MemoryCache` (:data:`CACHE_BYTES`) in front of a
    :class:`DiskCache` in :func:`subspace_cache_dir`, created on first use (never at import
    time) and again if the user folder changed. Hits from disk are float32 CPU tensors that
    were stored in float16 (≈ 4e-4 relative, see ``lorax_core.cache``). ``use_disk=False``: a
    :class:`NullCache`, so every subspace is recomputed and nothing is kept or written.

    Raises:
        CacheError: the cache folder cannot be created or written; the message names it and
            says to turn ``use_cache`` off.
    """
    global _cache
    if not use_disk:
        return NullCache()
    directory = subspace_cache_dir()
    if _cache is None or _cache[0] != directory:
        try:
            disk = DiskCache(directory)
        except CacheError:
            raise CacheError(
                f"the subspace cache folder {str(directory)!r} cannot be created or written; "
                "fix its permissions (or ComfyUI's --user-directory), or turn off use_cache on the node."
            ) from None
        _cache = (directory, MemoryCache(CACHE_BYTES, backing=disk))
    return _cache[1]


def compute_device() -> str:
    """Where the linear algebra runs: ComfyUI's torch device (``cpu`` under ``--cpu``)."""
    return str(comfy.model_management.get_torch_device())


def progress_callback() -> Callable[[int, int], None]:
    """A core ``progress(done, total)`` callback driving a ComfyUI progress bar.

    Every call is also a cancel point: ``throw_exception_if_processing_interrupted`` raises
    ComfyUI's ``InterruptProcessingException`` after the user pressed Cancel.
    """
    bar: list[comfy.utils.ProgressBar] = []

    def progress(done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if not bar:
            bar.append(comfy.utils.ProgressBar(total))
        bar[0].update_absolute(done, total)

    return progress


# --------------------------------------------------------------------------- folders and files


def source_model_names() -> list[str]:
    """Files the source-model combo offers: ``checkpoints`` then ``diffusion_models`` entries (``.gguf`` too)."""
    names: list[str] = []
    for folder in SOURCE_FOLDERS:
        names.extend(n for n in folder_paths.get_filename_list(folder) if n not in names)
        names.extend(n for n in _gguf_names(folder) if n not in names)
    return names


def _gguf_names(folder: str) -> list[str]:
    """``.gguf`` models in one of ComfyUI's model folders (its own lists leave that extension out).

    ComfyUI-GGUF's loader reads them from ``diffusion_models``/``unet``; the pack reads them
    itself (``lorax_core.gguf_model``), so they are offered as source models too.
    """
    found: list[str] = []
    for root in folder_paths.get_folder_paths(folder):
        files, _ = folder_paths.recursive_search(root, excluded_dir_names=[".git"])
        found.extend(sorted(folder_paths.filter_files_extensions(files, {".gguf"})))
    return found


def lora_names() -> list[str]:
    """Files in ComfyUI's ``loras`` folders."""
    return list(folder_paths.get_filename_list("loras"))


def _find(folders: tuple[str, ...], name: str, what: str) -> Path:
    for folder in folders:
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return Path(path)
    raise FormatError(
        f"{what} {name!r} is not in ComfyUI's {' or '.join(folders)} folders; refresh the page (R) and pick it again."
    )


@dataclass
class SourceModel:
    """The ``LORAX_SOURCE`` value: a lazy handle on the model file a LoRA was trained on.

    Reads only the header when created; :attr:`weights` reads one tensor per request
    (memory-mapped). No diffusion model, text encoder or VAE is built.

    Attributes:
        name: the file name as listed in ComfyUI.
        weights: lazy weights in the model-key namespace (``diffusion_model.…``, ``text_encoders.…``).
        family: ComfyUI's name for the detected model family (``SD15``, ``SDXL``…), or ``None``.
    """

    name: str
    weights: FileWeights
    family: str | None

    @property
    def has_text_encoder(self) -> bool:
        return any(k.startswith(TE_PREFIX) for k in self.weights.keys())

    def describe(self) -> str:
        te = "with text encoder" if self.has_text_encoder else "diffusion model only"
        return f"{self.name} ({self.family or 'unknown family'}, {te}, fingerprint {self.weights.fingerprint})"


def open_source(name: str) -> SourceModel:
    """Open a source model by its combo name (``.safetensors`` only; pickles are refused by the core)."""
    weights = open_model(_find(SOURCE_FOLDERS, name, "source model"))
    return SourceModel(name=name, weights=weights, family=_detect_family(weights))


def source_fingerprint(name: str) -> str:
    """``fingerprint_inputs`` value of the load node: the file's path, size and modification time."""
    for folder in SOURCE_FOLDERS:
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            stat = Path(path).stat()
            return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"missing:{name}"


def _detect_family(weights: FileWeights) -> str | None:
    """ComfyUI's own family detection, on shapes only (meta tensors: nothing is read)."""
    meta = {
        k[len(UNET_PREFIX) :]: torch.empty(weights.shape(k), device="meta")
        for k in weights.keys()
        if k.startswith(UNET_PREFIX)
    }
    config = comfy.model_detection.model_config_from_unet(meta, "") if meta else None
    return None if config is None else type(config).__name__


def model_family(model: Any) -> str:
    """The family ComfyUI detected for a ``MODEL`` (``SD15``, ``SDXL``, ``Flux``…)."""
    return type(model.model.model_config).__name__


# --------------------------------------------------------------------------- weights of a MODEL/CLIP


class PatcherWeights:
    """A :class:`~lorax_core.types.WeightSource` over a ``MODEL`` and optionally a ``CLIP``.

    Reads through ``ModelPatcher.get_key_patches``: the *unpatched* stored weight (even while a
    clone sharing the module is loaded and patched) plus this patcher's own patches, so a
    merged or LoRA-patched ``MODEL`` is read as the model it represents. Each :meth:`get`
    returns one float32 CPU tensor: ``convert_fn`` dequantises scaled-fp8/quantized storage,
    ``comfy.lora.calculate_weight`` adds the patches. The inputs are never modified.

    Fused weights: every slice ``(model key, (dim, offset, size))`` of ComfyUI's LoRA key map
    (Flux ``qkv``/``linear1``, SD3 ``qkv``) is listed too, under its canonical slice key
    (:mod:`lorax_core.slices`), and read as that part of the (patched) weight, so the core
    transfers it as a layer of its own. The fingerprint covers the stored weights only; cache
    keys tell slices apart by their key.
    """

    def __init__(self, model: Any | None, clip: Any | None = None) -> None:
        #: ComfyUI's LoRA key map of this MODEL/CLIP (:func:`lora_key_map`), built once: the
        #: plan and the similarity pairs use the same one.
        self.key_map = lora_key_map(model, clip)
        self._entries: dict[str, tuple[list[Any], Any]] = {}
        if model is not None:
            for key, patches in model.get_key_patches(UNET_PREFIX).items():
                self._entries[key] = (patches, model)
        if clip is not None:
            for key, patches in clip.patcher.get_key_patches().items():
                self._entries[TE_PREFIX + key] = (patches, clip.patcher)
        self._slices: dict[str, WeightSlice] = {}
        for target in self.key_map.values():
            piece = slice_from_comfy(target[0], target[1]) if isinstance(target, tuple) and len(target) > 1 else None
            if piece is not None and piece.base in self._entries and piece.fits(self.shape(piece.base)):
                self._slices[piece.key] = piece
        self._fingerprint: str | None = None
        # The last fused weight read for a slice: its sibling slices (q, k, v of one qkv) are
        # read one after another, and each would otherwise copy and patch the whole tensor again.
        self._fused: tuple[str, torch.Tensor] | None = None

    @property
    def fingerprint(self) -> str:
        """sha256 over key names, shapes, a 16-value sample of each stored weight and the patch ids."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for key in sorted(self._entries):
                patches, patcher = self._entries[key]
                weight = patches[0][0]
                h.update(f"{key}{tuple(weight.shape)}".encode())
                flat = weight.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 16)][:16]
                h.update(sample.to(device="cpu", dtype=torch.float32).numpy().tobytes())
                if len(patches) > 1:
                    h.update(str(patcher.patches_uuid).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def keys(self) -> Iterator[str]:
        yield from self._entries
        yield from self._slices

    def __contains__(self, key: object) -> bool:
        return key in self._entries or key in self._slices

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._slices:
            piece = self._slices[key]
            return piece.shape(self.shape(piece.base))
        return tuple(self._entries[key][0][0][0].shape)

    def get(self, key: str) -> torch.Tensor:
        if key in self._slices:
            # The whole fused weight with all its patches, then the rows: a patch on another
            # slice of it (or on the whole of it) is part of the model this MODEL represents.
            piece = self._slices[key]
            if self._fused is None or self._fused[0] != piece.base:
                self._fused = (piece.base, self.get(piece.base))
            return piece.take(self._fused[1])
        patches = self._entries[key][0]
        weight, convert_fn = patches[0]
        out = comfy.model_management.cast_to_device(weight, torch.device("cpu"), torch.float32, copy=True)
        out = convert_fn(out, inplace=True)
        if len(patches) > 1:
            comfy_key = key[len(TE_PREFIX) :] if key.startswith(TE_PREFIX) else key
            out = comfy.lora.calculate_weight(patches[1:], out, comfy_key)
        return out


# --------------------------------------------------------------------------- LoRA files and key maps


def _te_target(target: Any) -> Any:
    if isinstance(target, tuple):
        return (TE_PREFIX + target[0], *target[1:])
    return TE_PREFIX + target


def lora_key_map(model: Any | None, clip: Any | None) -> dict[str, Any]:
    """ComfyUI's ``{LoRA layer name: model key}`` map, text-encoder targets under ``text_encoders.``."""
    key_map: dict[str, Any] = {}
    if model is not None:
        key_map.update(comfy.lora.model_lora_keys_unet(model.model, {}))
    if clip is not None:
        clip_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
        key_map.update({name: _te_target(target) for name, target in clip_map.items()})
    return key_map


def load_lora_file(name: str | None, lora: Mapping[str, torch.Tensor] | None) -> LoraFile:
    """Read the LoRA from the ``loras`` combo, or from a ``LORA_MODEL`` input when connected.

    Keys pass through ``comfy.lora_convert.convert_lora`` first (BFL control LoRAs, Wan-Fun…),
    exactly as ComfyUI's ``LoraLoader`` does.
    """
    if lora is not None:
        tensors = comfy.lora_convert.convert_lora(dict(lora))
        return parse_lora(tensors, getattr(lora, "metadata", None), source="the LORA_MODEL input")
    if not name:
        raise FormatError("no LoRA: pick a file in lora_name or connect a LORA_MODEL input.")
    return read_lora(_find(("loras",), name, "LoRA"), key_transform=comfy.lora_convert.convert_lora)


def clip_rule(clip: Any | None) -> Callable[[str, str | None], str]:
    """The nodes' own planning rule (``host_rule`` of :func:`lorax_core.pipeline.plan_transfer`).

    Without a target CLIP, text-encoder layers are skipped with a pointer to the ``target_clip``
    input; the core reports them, nothing is dropped.
    """

    def needs_clip(name: str, key: str | None) -> str:
        if clip is not None:
            return ""
        is_te = name.startswith(TE_LAYER_PREFIXES) if key is None else key.startswith(TE_PREFIX)
        return TE_NEEDS_CLIP if is_te else ""

    return needs_clip


def plan_transfer(lora: LoraFile, source: SourceModel, model: Any, clip: Any | None,
                  key_map: Mapping[str, Any] | None = None) -> TransferPlan:
    """The core's transfer plan with ComfyUI's key map (:func:`lorax_core.pipeline.plan_transfer`).

    The key map comes from the target ``MODEL``/``CLIP`` (same family ⇒ same names as the
    source); pass :attr:`PatcherWeights.key_map` when there is one already. The nodes' own rule
    is :func:`clip_rule`.
    """
    return core_plan_transfer(
        lora, source.weights, lora_key_map(model, clip) if key_map is None else key_map, source_name=source.name,
        host_rule=clip_rule(clip),
    )


def _similarity_keys(source: SourceModel, plan: TransferPlan | None, key_map: Mapping[str, Any]) -> list[str]:
    """The source's 2-D/4-D weights the similarity node is asked about.

    With a LoRA: the layers it patches. Without: every weight a LoRA could patch here (the 2-D/4-D
    targets of ComfyUI's key map the source has).
    """
    if plan is not None:
        keys = list(plan.layers)
    else:
        targets = {t for t in key_map.values() if isinstance(t, str)}
        keys = [k for k in source.weights.keys() if k in targets]
    return [k for k in keys if k in source.weights and len(source.weights.shape(k)) in (2, 4)]


def _dims(shape: tuple[int, ...]) -> str:
    """``"out×in"`` of the flattened weight (the one flattening rule, ``types.flat_shape``)."""
    return "{}×{}".format(*flat_shape(shape))


def _related_families(source_family: str | None, model: Any) -> bool:
    """Whether the source's family is the target's or one ComfyUI derives from it (SSD1B and Segmind_Vega are SDXLs)."""
    if source_family is None:
        return False
    config = type(model.model.model_config)
    source_class = getattr(comfy.supported_models, source_family, None)
    return source_family == config.__name__ or (
        isinstance(source_class, type) and (issubclass(config, source_class) or issubclass(source_class, config))
    )


def similarity_precheck(source: SourceModel, model: Any, target: PatcherWeights, keys: list[str],
                        pairs: list[tuple[str, str]]) -> str:
    """Explain, before any decomposition, what cannot be compared and why: family, width, depth.

    Reads only names and shapes. Returns one line per finding (empty when the models have the
    same family, widths and depths): another family; layers the target lacks; layers whose
    widths differ (never compared: SD1.5's cross-attention is 320×768, SD2's 320×1024);
    blocks with another depth (a distilled target such as SSD-1B renumbers the blocks it keeps,
    so its same-named layers may be other layers; Transfer LoRA's ``auto`` pairing checks them
    by similarity, this table compares names).

    Raises:
        IncompatibleBaseError: no layer has a namesake of the same shape in the target: nothing
            could be compared; the message names both families and an example layer.
    """
    family = model_family(model)
    notes: list[str] = []
    if not _related_families(source.family, model):
        notes.append(f"the source is {source.family or 'of an unknown family'} and the target is {family}: "
                     "different model families; unrelated weights score near chance")
    missing = [k for k in keys if k not in target]
    if missing:
        notes.append(f"{len(missing)} of {len(keys)} layers have no namesake in the target (e.g. {missing[0]})")
    widths = [(s, source.weights.shape(s), target.shape(t)) for s, t in pairs]
    wide = [(s, a, b) for s, a, b in widths if _dims(a) != _dims(b)]
    if wide:
        s, a, b = wide[0]
        notes.append(f"{len(wide)} of {len(pairs)} layers differ in width and are not compared "
                     f"(e.g. {s}: source {_dims(a)}, target {_dims(b)}); no transfer across widths")
    depths = depth_mismatches(
        [k for k in source.weights.keys() if k.startswith(UNET_PREFIX)],
        [k for k in target.keys() if k.startswith(UNET_PREFIX)],
    )
    if depths:
        block, (a, b) = next(iter(depths.items()))
        notes.append(f"{len(depths)} blocks have another depth (e.g. {block}: {a} in the source, {b} in the target); "
                     "the target renumbers the blocks it keeps, so same-named layers there may be other layers: "
                     "Transfer LoRA (match auto) pairs them by similarity")
    if keys and len(wide) == len(pairs):
        example = f"{wide[0][0]}: source {_dims(wide[0][1])}, target {_dims(wide[0][2])}" if wide else \
            f"{missing[0]} is not in the target"
        raise IncompatibleBaseError(
            f"source {source.name} ({source.family or 'unknown family'}) and target ({family}) share no layer of "
            f"the same shape among the {len(keys)} asked about (e.g. {example}); nothing can be compared. Pick a "
            f"target of the source's family, or the source model the target was made from."
        )
    return "\n".join(f"pre-check: {note}." for note in notes)


def similarity_inputs(source: SourceModel, model: Any, clip: Any | None, lora_name: str,
                      no_lora: str) -> tuple[PatcherWeights, list[tuple[str, str]], str]:
    """The target weights, the key pairs the similarity node compares, and the pre-check's notes."""
    target = PatcherWeights(model, clip)
    plan = None
    if lora_name != no_lora:
        plan = plan_transfer(load_lora_file(lora_name, None), source, model, clip, target.key_map)
    keys = _similarity_keys(source, plan, target.key_map)
    # Same-name pairs: with a LoRA the layers it patches, without every weight a LoRA could patch.
    pairs = [(k, k) for k in keys if k in target]
    return target, pairs, similarity_precheck(source, model, target, keys, pairs)


# --------------------------------------------------------------------------- LORA_MODEL values


class TransferredLora(dict):
    """A ``LORA_MODEL`` (``{ComfyUI-native key: tensor}``) that also remembers where it came from.

    Core nodes (``LoraModelLoader``, ``SaveLoRA``) see a plain dict. The save node uses the
    extra attributes to write the source file's key style and provenance metadata.

    Attributes:
        factors: ``{target model key: LoraFactors}`` as the core returned them.
        layer_names: ``{target model key: layer name in the source LoRA's style}``.
        lora_file: the source LoRA as read (its key styles), or ``None``.
        metadata: provenance, string values.
        report: the core's ``TransferReport``.
    """

    factors: dict[str, LoraFactors]
    layer_names: dict[str, str]
    lora_file: LoraFile | None
    metadata: dict[str, str]
    report: Any


def _native_name(model_key: str, layer_name: str) -> str:
    """The ``LORA_MODEL`` name of a transferred layer: the model key without ``.weight``.

    A slice of a fused weight (:mod:`lorax_core.slices`) has no such name; it keeps the LoRA's
    own layer name (``transformer.transformer_blocks.0.attn.to_q``), which ComfyUI's key map
    sends to the same rows. ``layer_name`` must then be that name, not one made up for the key.

    Raises:
        FormatError: a slice whose layer name is not one the key map knows (the layer was
            paired by similarity with another block's slice, which no LoRA name of this file addresses).
    """
    if parse_slice_key(model_key) is None:
        return model_key[: -len(".weight")] if model_key.endswith(".weight") else model_key
    # output_names falls back to a name derived from the key itself, which ends in the slice suffix.
    if layer_name.endswith(model_key[model_key.rindex("[") :]):
        raise FormatError(
            f"{model_key} is a slice of a fused weight that only ComfyUI's key map can name, and the LoRA has no "
            "layer for it (a source layer was paired with it by similarity, as when the target has fewer blocks); "
            "transfer onto a model with the source's blocks, or leave that layer out of the LoRA."
        )
    return layer_name


def wrap_result(result: TransferResult, plan: TransferPlan, lora: LoraFile, metadata: dict[str, str]) -> TransferredLora:
    """Turn the core's result into a ComfyUI-native ``LORA_MODEL`` with provenance attached."""
    out = TransferredLora()
    out.layer_names = output_names(result, plan, lora.format)
    for key, factors in result.layers.items():
        out.update(layer_tensors(_native_name(key, out.layer_names[key]), factors, COMFY_STYLE))
    out.factors = dict(result.layers)
    out.lora_file = LoraFile(format=lora.format, layers={}, styles=dict(lora.styles))
    out.metadata = dict(metadata)
    out.report = result.report
    return out


@dataclass
class Applied:
    """What applying a ``LORA_MODEL`` did."""

    model: Any
    clip: Any
    layers: int
    patched_model: list[Any] = field(default_factory=list)
    patched_clip: list[Any] = field(default_factory=list)


def apply_lora(model: Any, clip: Any | None, lora: Mapping[str, torch.Tensor],
               strength_model: float, strength_clip: float) -> Applied:
    """Clone ``model``/``clip`` and add the LoRA's patches (ComfyUI's ``load_lora`` + ``add_patches``).

    The inputs are never modified. Raises :class:`IncompatibleBaseError` when no layer of the
    LoRA fits the model (a LoRA for another base family), instead of ComfyUI's silent no-op.
    """
    tensors = comfy.lora_convert.convert_lora(dict(lora))
    layer_count = len({s[0] for s in map(split_key, tensors) if s is not None})
    unet_patches = comfy.lora.load_lora(tensors, comfy.lora.model_lora_keys_unet(model.model, {}), log_missing=False)
    new_model = model.clone()
    patched_model = new_model.add_patches(unet_patches, strength_model)
    new_clip, patched_clip = clip, []
    if clip is not None:
        clip_patches = comfy.lora.load_lora(
            tensors, comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}), log_missing=False
        )
        new_clip = clip.clone()
        patched_clip = new_clip.add_patches(clip_patches, strength_clip)
    misfits = _misfits(unet_patches, new_model) + (_misfits(clip_patches, new_clip.patcher) if clip is not None else [])
    if misfits:
        key, want, have = misfits[0]
        raise IncompatibleBaseError(
            f"{len(misfits)} of the LoRA's {layer_count} layers do not fit this {model_family(model)} model "
            f"(e.g. {key}: the LoRA changes a {want} weight, the model's is {have}); it was made for another "
            "base model family — transfer it with Transfer LoRA first."
        )
    if not patched_model and not patched_clip:
        raise IncompatibleBaseError(
            f"none of the LoRA's {layer_count} layers fits this {model_family(model)} model; "
            "it was made for another base model family — transfer it with Transfer LoRA first."
        )
    return Applied(new_model, new_clip, layer_count, patched_model, patched_clip)


def _misfits(patches: Mapping[Any, Any], patcher: Any) -> list[tuple[str, str, str]]:
    """``(model key, LoRA ΔW shape, weight shape)`` of every LoRA patch whose shape does not fit.

    ComfyUI only logs "SHAPE MISMATCH … WEIGHT NOT MERGED" at sampling time; we check up front.
    """
    state = patcher.model_state_dict()
    out = []
    for target, patch in patches.items():
        key = target if isinstance(target, str) else target[0]
        if not isinstance(patch, LoRAAdapter) or key not in state or not isinstance(target, str):
            continue
        up, down = patch.weights[0], patch.weights[1]
        weight = state[key].shape
        want = (int(up.shape[0]), int(down[0].numel()))
        have = (int(weight[0]), int(torch.Size(weight[1:]).numel()))
        if want != have:
            out.append((key, "×".join(map(str, want)), "×".join(map(str, have))))
    return out


# --------------------------------------------------------------------------- saving


def save_folder() -> Path:
    """``<first loras folder>/lorax``, created if needed (the stock LoraLoader lists it after a refresh).

    Raises:
        OutputError: the folder cannot be created (read-only disk, permissions, a file in its place).
    """
    folder = Path(folder_paths.get_folder_paths("loras")[0]) / SAVE_SUBFOLDER
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"{folder}: cannot create the save folder ({exc.strerror or exc}); make ComfyUI's loras folder "
            "writable, or point it elsewhere with extra_model_paths.yaml."
        ) from None
    return folder


def save_lora(lora: Mapping[str, torch.Tensor], file_name: str) -> Path:
    """Write a ``LORA_MODEL`` under :func:`save_folder`, atomically, never overwriting.

    A :class:`TransferredLora` is written in its source LoRA's key style with its provenance
    metadata, together with its ``.report.json`` (both or neither, through the core's one
    atomic writer); any other ``LORA_MODEL`` in ComfyUI-native style. An existing name (of
    either file) gets a counter suffix (``name_00001.safetensors``…) instead of being replaced.

    Raises:
        OutputError: the write failed (disk full, read-only folder, name too long); nothing is
            left in the folder.
        NonFiniteError: the LoRA holds NaN or Inf; nothing is written.
    """
    if isinstance(lora, TransferredLora):
        layers = {lora.layer_names[k]: f for k, f in lora.factors.items()}
        style: LoraFile | str = lora.lora_file if lora.lora_file is not None else "comfy"
        metadata = dict(lora.metadata)
    else:
        parsed = parse_lora(dict(lora), source="the LORA_MODEL input")
        if not parsed.layers:
            reason, count = Counter(parsed.unsupported.values()).most_common(1)[0]
            raise FormatError(
                f"the LORA_MODEL input has no layer this pack can save ({count} of {len(parsed.unsupported)}: "
                f"{reason}); nothing was written. Check the node that made it."
            )
        layers, style, metadata = parsed.layers, parsed, {"lorax.origin": "LORA_MODEL input"}
    stem = file_name[: -len(".safetensors")] if file_name.endswith(".safetensors") else file_name
    report_text = lora.report.to_json() if isinstance(lora, TransferredLora) else None

    def write(candidate: Path) -> Path:
        report = {candidate.with_suffix(".report.json"): report_text} if report_text is not None else None
        return write_lora(candidate, layers, style=style, metadata=metadata, extra_files=report)

    return write_numbered(stem, write)


def write_numbered(stem: str, write: Callable[[Path], Path]) -> Path:
    """``write(path)`` at the first free name ``<save folder>/<stem>[_NNNNN].safetensors``.

    ``write`` must refuse an existing name with :class:`OutputExistsError` (the core's writer does,
    atomically), so two saves racing for one name both succeed under different names.
    """
    folder = save_folder()
    for counter in range(100000):
        candidate = folder / (f"{stem}.safetensors" if counter == 0 else f"{stem}_{counter:05d}.safetensors")
        try:
            return write(candidate)
        except OutputExistsError:
            continue
    raise OutputExistsError(f"{folder}: 100000 files named {stem}_*.safetensors exist; choose another file name.")


def loras_relative_name(path: Path) -> str:
    """The name the stock ``LoraLoader`` lists for ``path`` (relative to its ``loras`` folder)."""
    root = Path(folder_paths.get_folder_paths("loras")[0])
    return path.relative_to(root).as_posix()


ALL_LORAS = "(all loras)"


def lora_subfolders() -> list[str]:
    """The folder choices of Migrate LoRA Folder: :data:`ALL_LORAS`, then every sub-folder holding a LoRA
    (``/``-separated, relative to the ``loras`` folders; the pack's own ``lorax/`` outputs excluded)."""
    folders = {Path(name).parent.as_posix() for name in lora_names()}
    return [ALL_LORAS, *sorted(f for f in folders if f != "." and f.split("/")[0] != SAVE_SUBFOLDER)]


def lora_subfolder(name: str) -> Path:
    """The folder a :func:`lora_subfolders` choice names: under the first ``loras`` folder that has it.

    Raises:
        OptionError: no ``loras`` folder holds it (it was moved since the list was made).
    """
    roots = [Path(p) for p in folder_paths.get_folder_paths("loras")]
    for root in roots:
        folder = root if name == ALL_LORAS else root / name
        if folder.is_dir():
            return folder
    raise OptionError(
        f"folder {name!r} is not in any loras folder ({', '.join(map(str, roots))}); refresh the page (R) and pick "
        "one from the list."
    )
