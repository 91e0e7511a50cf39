"""Lazy reading of base models from ``.safetensors`` files, one tensor at a time.

:class:`SafetensorsWeights` implements :class:`lorax_core.types.WeightSource`: it reads the header
once and then one tensor per :meth:`~SafetensorsWeights.get` call (a positional read of that
tensor's bytes), so transferring a LoRA touches only the layers the LoRA patches and memory
holds only the tensors in use.

Model-key namespace (the keys :meth:`~SafetensorsWeights.keys` returns):

=========================================  ==========================================
file key                                   model key
=========================================  ==========================================
``model.diffusion_model.<p>``              ``diffusion_model.<p>``     (full checkpoint)
``diffusion_model.<p>``                    ``diffusion_model.<p>``
``<p>`` (diffusion-model-only file)        ``diffusion_model.<p>``
``cond_stage_model.transformer.<p>``       ``text_encoders.clip_l.transformer.<p>`` (SD1.x CLIP-L)
``cond_stage_model.model.<p>``             ``text_encoders.clip_h.<p>`` (SD2.x OpenCLIP-H)
``conditioner.embedders.0.transformer.<p>``  ``text_encoders.clip_l.transformer.<p>`` (SDXL)
``conditioner.embedders.1.model.<p>``      ``text_encoders.clip_g.<p>`` (SDXL OpenCLIP-G)
``conditioner.embedders.<N>.<p>`` (other)  ``text_encoders.embedder_<N>.<p>``
``text_encoders.<p>``                      ``text_encoders.<p>``
anything else in a full checkpoint         kept as is (e.g. ``first_stage_model.*``, the VAE)
=========================================  ==========================================

``diffusion_model.*`` and ``text_encoders.clip_l.*`` match the names ComfyUI gives the same
weights, so ComfyUI-native LoRA names resolve directly.

The OpenCLIP encoders (``clip_h`` of SD2.x, ``clip_g`` of SDXL) are then presented by
:class:`SafetensorsWeights` under the Hugging Face names ComfyUI gives them when it loads a
checkpoint (``comfy.utils.clip_text_transformers_convert``, v0.3.75), because every LoRA format
(kohya ``lora_te_``/``lora_te2_``, diffusers ``text_encoder_2.``, ComfyUI-native) names them so:

=====================================================  =====================================================
OpenCLIP name under ``text_encoders.clip_{h,g}.``      presented as ``text_encoders.clip_{h,g}.transformer.``
=====================================================  =====================================================
``transformer.resblocks.N.attn.in_proj_{weight,bias}``  ``text_model.encoder.layers.N.self_attn.{q,k,v}_proj.*``
                                                       (rows ``[0, w)``, ``[w, 2w)``, ``[2w, 3w)`` of the fused
                                                       ``(3w, w)`` weight, read as row slices)
``transformer.resblocks.N.attn.out_proj.*``            ``text_model.encoder.layers.N.self_attn.out_proj.*``
``transformer.resblocks.N.mlp.c_fc.*``, ``c_proj.*``    ``text_model.encoder.layers.N.mlp.fc1.*``, ``fc2.*``
``transformer.resblocks.N.ln_1.*``, ``ln_2.*``          ``text_model.encoder.layers.N.layer_norm1.*``, ``2.*``
``positional_embedding``, ``token_embedding.weight``    ``text_model.embeddings.{position,token}_embedding.weight``
``ln_final.*``                                         ``text_model.final_layer_norm.*``
=====================================================  =====================================================

``text_projection`` keeps its OpenCLIP name: ComfyUI stores it transposed, and no LoRA format
patches it. :func:`model_key_map` does only the prefix renaming of the first table.
"""

from __future__ import annotations

import hashlib
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import FormatError, NonFiniteError
from .formats.io import SAFETENSORS_DTYPES, read_header
from .quant import (
    FP8_DTYPES,
    SCALE_INPUT,
    SCALE_WEIGHT,
    SCALED_FP8_MARKER,
    check_scale,
    dequantize_scaled_fp8,
    nonfinite_count,
)
from .slices import parse_slice_key

__all__ = [
    "FileTensor",
    "FileWeights",
    "SafetensorsWeights",
    "file_fingerprint",
    "model_key_map",
    "open_model",
    "tensor_views",
]

_TEXT_ENCODER_RENAMES: tuple[tuple[str, str], ...] = (
    ("cond_stage_model.transformer.", "text_encoders.clip_l.transformer."),
    ("cond_stage_model.model.", "text_encoders.clip_h."),
    ("conditioner.embedders.0.transformer.", "text_encoders.clip_l.transformer."),
    ("conditioner.embedders.1.model.", "text_encoders.clip_g."),
)
# The OpenCLIP text encoders ComfyUI renames on load (SD2.x clip_h, SDXL clip_g).
_OPENCLIP_PREFIXES: tuple[str, ...] = ("text_encoders.clip_h.", "text_encoders.clip_g.")
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
# comfy.utils.transformers_convert's resblock_to_replace and keys_to_replace (v0.3.75).
_RESBLOCK_RENAMES: dict[str, str] = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_TOP_RENAMES: dict[str, str] = {
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_QKV: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_FINGERPRINT_SAMPLES = 16
_FINGERPRINT_SAMPLE_BYTES = 4096


def model_key_map(file_keys: list[str]) -> dict[str, str]:
    """``{model key: file key}`` for a model file's tensor names (see the module table).

    A file is a *full checkpoint* when any key starts with ``model.diffusion_model.``; a file
    whose keys already use ``diffusion_model.``/``text_encoders.`` is kept as is; otherwise every
    key is a bare diffusion-model path and gets ``diffusion_model.`` in front.
    """
    if any(k.startswith("model.diffusion_model.") for k in file_keys):
        return {_checkpoint_key(k): k for k in file_keys}
    if any(k.startswith(("diffusion_model.", "text_encoders.")) for k in file_keys):
        return {k: k for k in file_keys}
    return {f"diffusion_model.{k}": k for k in file_keys}


def _checkpoint_key(key: str) -> str:
    if key.startswith("model.diffusion_model."):
        return key[len("model.") :]
    for old, new in _TEXT_ENCODER_RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    if key.startswith("conditioner.embedders."):
        index, _, rest = key[len("conditioner.embedders.") :].partition(".")
        return f"text_encoders.embedder_{index}.{rest}"
    return key


@dataclass(frozen=True)
class FileTensor:
    """Where a model key's weight lies in the file: a tensor, or rows ``[start, start + rows)`` of one.

    Attributes:
        name: the tensor's name inside the file.
        start, rows: the row slice of a fused tensor (``rows is None``: the whole tensor).
    """

    name: str
    start: int = 0
    rows: int | None = None


def tensor_views(file_keys: list[str], shapes: dict[str, tuple[int, ...]]) -> dict[str, FileTensor]:
    """``{model key: FileTensor}``: :func:`model_key_map`, then OpenCLIP layers under ComfyUI's HF names.

    Args:
        file_keys: the file's tensor names.
        shapes: ``{file key: shape}`` (the fused ``in_proj`` is split by its first dimension, 3w).

    The renaming and the equal three-way row split are those of ComfyUI's
    ``comfy.utils.transformers_convert`` (v0.3.75), so a text-encoder weight read from the file
    equals the one ComfyUI loads under the same name (checked in ``tests/nodes/test_families_unet.py``).
    """
    out: dict[str, FileTensor] = {}
    for model_key, file_key in model_key_map(file_keys).items():
        prefix = next((p for p in _OPENCLIP_PREFIXES if model_key.startswith(p)), None)
        if prefix is None:
            out[model_key] = FileTensor(file_key)
            continue
        rest = model_key[len(prefix) :]
        head = f"{prefix}transformer."
        block = _RESBLOCK.fullmatch(rest)
        if rest in _TOP_RENAMES:
            out[head + _TOP_RENAMES[rest]] = FileTensor(file_key)
        elif block is None:
            out[model_key] = FileTensor(file_key)
        elif block.group(2) in ("attn.in_proj_weight", "attn.in_proj_bias") and shapes[file_key][0] % 3 == 0:
            width = shapes[file_key][0] // 3
            suffix = block.group(2).rsplit("_", 1)[1]
            for i, part in enumerate(_QKV):
                name = f"{head}text_model.encoder.layers.{block.group(1)}.{part}.{suffix}"
                out[name] = FileTensor(file_key, i * width, width)
        else:
            module, _, param = block.group(2).rpartition(".")
            renamed = _RESBLOCK_RENAMES.get(module)
            if renamed is None:
                out[model_key] = FileTensor(file_key)
            else:
                out[f"{head}text_model.encoder.layers.{block.group(1)}.{renamed}.{param}"] = FileTensor(file_key)
    return out


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """A cheap, stable fingerprint: sha256 over the header and 16 evenly spaced 4 KiB samples.

    Reads at most ~64 KiB of tensor data whatever the file size, so it is safe on multi-GB
    checkpoints. Two files that differ only in unsampled bytes share a fingerprint; it is an
    identity for caching and provenance, not an integrity check. Returns 16 hex digits.

    Raises:
        FormatError: as :func:`lorax_core.formats.io.read_header`.
    """
    p = Path(path)
    read_header(p)
    try:
        with p.open("rb") as fh:
            data_start = 8 + int.from_bytes(fh.read(8), "little")
    except OSError as exc:
        raise FormatError(f"{p}: cannot read the file ({exc.strerror or exc}); check its permissions.") from None
    return sampled_fingerprint(p, data_start, header_start=8)


def sampled_fingerprint(path: Path, data_start: int, *, header_start: int = 0) -> str:
    """sha256 over the header bytes ``[header_start, data_start)``, the data length and 16 evenly spaced 4 KiB samples.

    The fingerprint of :func:`file_fingerprint`, for any format whose tensor data starts at
    ``data_start`` (GGUF too). Returns 16 hex digits.

    Raises:
        FormatError: the file cannot be read.
    """
    h = hashlib.sha256()
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            fh.seek(header_start)
            h.update(fh.read(data_start - header_start))
            data_len = size - data_start
            h.update(str(data_len).encode())
            if data_len > 0:
                step = max(1, data_len // _FINGERPRINT_SAMPLES)
                for offset in range(0, data_len, step)[:_FINGERPRINT_SAMPLES]:
                    fh.seek(data_start + offset)
                    h.update(fh.read(_FINGERPRINT_SAMPLE_BYTES))
    except OSError as exc:
        raise FormatError(f"{path}: cannot read the file ({exc.strerror or exc}); check its permissions.") from None
    return h.hexdigest()[:16]


class FileWeights(ABC):
    """A lazy :class:`~lorax_core.types.WeightSource` over one model file: what every file format shares.

    Holds the ``{model key: FileTensor}`` views (:func:`tensor_views`) and the slice keys of
    fused weights; a subclass reads one file tensor (or a row range of it) in :meth:`_read`.
    :meth:`get` then checks the values (one float32 copy of the layer for fp8, never the model).

    Args:
        path: the model file.
        shapes: ``{tensor name in the file: shape}`` (the shape ComfyUI gives the tensor).
        metadata: the file's string metadata.
    """

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> None:
        self.path = path
        self.metadata = metadata
        self._shapes = shapes
        self._files = tensor_views(list(shapes), shapes)
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = file_fingerprint(self.path)
        return self._fingerprint

    @property
    def file_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{tensor name in the file: shape}``, as the header gave them (no tensor is read)."""
        return dict(self._shapes)

    @property
    def is_checkpoint(self) -> bool:
        """Whether the file is a full checkpoint (``model.diffusion_model.*`` keys)."""
        return any(v.name.startswith("model.diffusion_model.") for v in self._files.values())

    def keys(self) -> Iterator[str]:
        return iter(self._files)

    def __contains__(self, key: object) -> bool:
        return key in self._files or (isinstance(key, str) and self._add_slice(key))

    def __len__(self) -> int:
        return len(self._files)

    def file_key(self, key: str) -> str:
        """The tensor's name inside the file (the fused tensor for a row slice)."""
        return self._files[self._check(key)].name

    def shape(self, key: str) -> tuple[int, ...]:
        view = self._files[self._check(key)]
        shape = self._shapes[view.name]
        return shape if view.rows is None else (view.rows, *shape[1:])

    def get(self, key: str) -> torch.Tensor:
        """The weight (or row slice) on CPU: the stored dtype, or float32 where the file quantises it.

        fp8 stays fp8 (every consumer upcasts one layer at a time); ComfyUI's scaled fp8 and GGUF
        come back dequantised to float32, as ComfyUI computes them.

        Raises:
            FormatError: unreadable, truncated or malformed tensor; NonFiniteError: NaN or Inf.
        """
        view = self._files[self._check(key)]
        tensor = self._read(view, self.shape(key))
        # Checked where the data enters: a NaN would otherwise flow into the SVD and come out as
        # a meaningless similarity (min(1.0, nan) reads 1.0) or a LinAlgError.
        bad = nonfinite_count(tensor)
        if bad:
            raise NonFiniteError(
                f"{self.path}: weight {view.name!r} holds {bad} NaN or Inf values of {tensor.numel()}; the model file "
                "is damaged (or was saved after a diverged fine-tune). Re-download it, or use another model."
            )
        return tensor

    @abstractmethod
    def _read(self, view: FileTensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The values of ``view`` (``shape``), on CPU; the subclass's file format."""

    def add_slices(self, keys: Iterable[str]) -> None:
        """List the slice keys among ``keys`` that fit this file (see :meth:`_add_slice`); others are ignored.

        The target of a transfer needs this: the core pairs source and target layers by the
        target's :meth:`keys`, before it reads any of them. Pass the plan's source keys.
        """
        for key in keys:
            self._add_slice(key)

    def _add_slice(self, key: str) -> bool:
        """Register ``key`` as a row view if it is a slice key ``<key>[0:<offset>:<size>]`` that fits.

        Slice keys (:mod:`lorax_core.slices`) come from ComfyUI's key map for fused weights
        (Flux ``qkv``/``linear1``, SD3 ``qkv``). The first :meth:`shape`/:meth:`get`/``in`` of
        one makes it a :class:`FileTensor` row view of its weight, read alone like any tensor
        and listed by :meth:`keys` from then on (the transfer looks its source keys up there).
        Only dimension 0 is sliced: every fused weight ComfyUI maps is split by output rows.

        Returns:
            Whether ``key`` is now a registered slice.
        """
        piece = parse_slice_key(key)
        view = None if piece is None else self._files.get(piece.base)
        if piece is None or view is None or piece.dim != 0 or not piece.fits(self.shape(piece.base)):
            return False
        self._files[key] = FileTensor(view.name, view.start + piece.offset, piece.size)
        return True

    def close(self) -> None:  # noqa: B027 - a default: only a reader holding a handle overrides it
        """Nothing to release: every :meth:`get` opens, reads and closes the file."""

    def _check(self, key: str) -> str:
        if key not in self._files and not self._add_slice(key):
            raise FormatError(f"{self.path}: no weight {key!r} in this model; check that it is the right base model.")
        return key

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self._files)} tensors)"


class SafetensorsWeights(FileWeights):
    """A lazy weight source over one ``.safetensors`` model file.

    ``get`` returns the stored dtype on CPU (callers upcast to float32 themselves); fp8 weights
    of ComfyUI's *scaled* fp8 layout (a ``scaled_fp8`` marker, per-layer ``scale_weight``) come
    back dequantised to float32 exactly as ComfyUI computes them (:mod:`lorax_core.quant`). The
    file tensor is read with a positional file read, so nothing stays mapped between calls.

    Args:
        path: the model file. Pickle files (``.ckpt``/``.pt``/``.bin``…) are refused.

    Raises:
        FormatError: missing, corrupt or truncated file; UnsafeFileError for pickles; from
            :meth:`get`, a scaled-fp8 layer whose scale is missing or not one number.
        NonFiniteError: from :meth:`get`, for a weight (or scale) that holds NaN or Inf.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        header, metadata = read_header(p)
        shapes = {name: tuple(int(d) for d in entry["shape"]) for name, entry in header.items()}  # type: ignore[union-attr]
        super().__init__(p, shapes, metadata)
        self._entries = header
        #: ComfyUI's scaled-fp8 layout: a ``[prefix]scaled_fp8`` marker tensor.
        self.scaled_fp8 = any(n == SCALED_FP8_MARKER or n.endswith(f".{SCALED_FP8_MARKER}") for n in header)
        # Tensor data starts after the 8-byte length prefix and the JSON header.
        try:
            with self.path.open("rb") as fh:
                self._data_start = 8 + int.from_bytes(fh.read(8), "little")
        except OSError as exc:
            raise FormatError(
                f"{self.path}: cannot read the file ({exc.strerror or exc}); check its permissions."
            ) from None

    def _read(self, view: FileTensor, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = self._read_bytes(view, shape)
        if self.scaled_fp8 and view.name.endswith(".weight") and tensor.dtype in FP8_DTYPES:
            module = view.name[: -len("weight")]
            scales = {s: self._scale(module + s) for s in (SCALE_WEIGHT, SCALE_INPUT)}
            check_scale(scales[SCALE_WEIGHT], where=str(self.path), name=module + SCALE_WEIGHT, required=True)
            check_scale(scales[SCALE_INPUT], where=str(self.path), name=module + SCALE_INPUT, required=False)
            tensor = dequantize_scaled_fp8(tensor, scales[SCALE_WEIGHT])  # type: ignore[arg-type]
        return tensor

    def _scale(self, name: str) -> torch.Tensor | None:
        """A scale tensor of the file by name (``None`` if absent); read as stored, any dtype."""
        if name not in self._entries:
            return None
        entry = self._entries[name]
        dtype = SAFETENSORS_DTYPES[str(entry["dtype"])]
        return self._read_bytes(FileTensor(name), self._shapes[name], dtype=dtype)

    def _read_bytes(self, view: FileTensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        """The stored values of ``view`` (a tensor or a row range of one), with one positional read."""
        name = view.name
        entry = self._entries[name]
        stored = SAFETENSORS_DTYPES[str(entry["dtype"])]  # read_header admitted only known names
        # Integer and bool tensors are never base weights (step counters, token ids...).
        if dtype is None and not stored.is_floating_point:
            raise FormatError(
                f"{self.path}: tensor {name!r} has dtype {entry['dtype']!r}, which is not a weight dtype "
                "(expected F16, BF16, F32, F64 or F8); check that the file is a model."
            )
        start, end = (int(v) for v in entry["data_offsets"])  # type: ignore[union-attr]
        if view.rows is not None:
            # A row slice of a row-major tensor is one contiguous byte range.
            row_bytes = (end - start) // max(1, self._shapes[name][0])
            start += view.start * row_bytes
            end = start + view.rows * row_bytes
        # A plain positional read instead of safetensors' memory map: every page a mmap view
        # touches stays resident until the file is closed, so streaming a whole UNet through
        # get_tensor grows the process by the model's size (measured on 60 SD1.5 layers: +346 MB
        # file-backed memory with the map, +24 MB with this read; benchmarks/results/PERF.md).
        buffer = bytearray(end - start)
        try:
            with self.path.open("rb") as fh:
                fh.seek(self._data_start + start)
                got = fh.readinto(buffer)
        except OSError as exc:
            raise FormatError(
                f"{self.path}: could not read tensor {name!r} ({exc}); the file may be corrupt."
            ) from None
        if got != len(buffer):
            raise FormatError(
                f"{self.path}: truncated: tensor {name!r} needs {len(buffer)} bytes but only {got} could be read. "
                "Re-download or re-save the file."
            )
        if not buffer:
            return torch.empty(shape, dtype=stored)
        return torch.frombuffer(buffer, dtype=stored).reshape(shape)


def open_model(path: str | os.PathLike[str]) -> FileWeights:
    """Open a base model for lazy reading: ``.gguf`` files with :class:`~.gguf_model.GGUFWeights`,
    everything else as :class:`SafetensorsWeights` (which refuses pickles)."""
    if Path(path).suffix.lower() == ".gguf":
        from .gguf_model import GGUFWeights  # imports the optional gguf package

        return GGUFWeights(path)
    return SafetensorsWeights(path)
