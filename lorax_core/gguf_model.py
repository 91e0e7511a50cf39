"""Lazy reading of GGUF-quantized diffusion models (the files ComfyUI-GGUF's Unet Loader loads).

:class:`GGUFWeights` is a :class:`~lorax_core.modelio.FileWeights`: the llama.cpp project's
``gguf`` package (``pip install gguf``; ComfyUI-GGUF requires it too) parses the file and
memory-maps its data, and each :meth:`~lorax_core.modelio.FileWeights.get` dequantises one
layer (or the rows of a fused weight's slice) with ``gguf.quants.dequantize`` — the package's
own dequantisation, so Q8_0, Q6_K, Q5_K, Q4_K, Q4_0… read exactly as llama.cpp defines them.
Nothing else is read: a transfer touches only the layers its LoRA patches.

Tensor names and shapes follow what ComfyUI-GGUF presents to ComfyUI (its ``gguf_sd_loader``):

* a file whose tensors carry the checkpoint prefix ``model.diffusion_model.`` contributes only
  those tensors, prefix removed; otherwise every tensor name is a diffusion-model key;
* a tensor's shape is the ``comfy.gguf.orig_shape.<name>`` metadata array where present (5-D
  and other reshaped tensors), else GGUF's dimensions reversed (GGUF lists the innermost first).

Those names then enter the model-key namespace as bare diffusion-model keys
(``diffusion_model.<name>``, :func:`lorax_core.modelio.model_key_map`). Text-encoder GGUFs
(llama.cpp architectures ``t5``, ``llama``…) are refused: they are not base models of a LoRA here.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import FormatError, OptionError
from .modelio import FileTensor, FileWeights, sampled_fingerprint

__all__ = ["GGUFWeights"]

#: The prefix ComfyUI-GGUF strips (and whose tensors alone it keeps) when a file carries it.
CHECKPOINT_PREFIX = "model.diffusion_model."
#: Metadata key ComfyUI-GGUF's converter writes for tensors whose GGUF shape was flattened.
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape.{}"
#: llama.cpp architectures of text encoders (ComfyUI-GGUF's CLIP loaders read these).
TEXT_ARCHITECTURES = frozenset({"t5", "t5encoder", "llama", "qwen2vl"})
GGUF_MAGIC = b"GGUF"


def _gguf() -> Any:
    """The ``gguf`` package, or a clear error (it is needed only for ``.gguf`` models)."""
    try:
        import gguf
    except ImportError:
        raise OptionError(
            "reading a .gguf model needs the gguf package (the llama.cpp project's reader, which ComfyUI-GGUF also "
            "uses); install it into this Python with `pip install gguf`."
        ) from None
    return gguf


class GGUFWeights(FileWeights):
    """A lazy weight source over one ``.gguf`` diffusion model; :meth:`get` returns float32 CPU tensors.

    Attributes:
        architecture: ``general.architecture`` (``flux``, ``sd3``, ``wan``…; ``None`` for files
            written without one, as stable-diffusion.cpp does).
        quant_types: ``{GGUF type name: tensor count}`` over the tensors read as weights.

    Raises:
        OptionError: the ``gguf`` package is not installed.
        FormatError: not a GGUF file, truncated or corrupt, a quantization type the installed
            ``gguf`` does not know, a text-encoder GGUF; from ``get``, a type it cannot dequantise.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        gguf = _gguf()
        if not p.is_file():
            raise FormatError(f"{p}: no such file; check the path.")
        try:
            with p.open("rb") as fh:
                magic = fh.read(4)
        except OSError as exc:
            raise FormatError(f"{p}: cannot read the file ({exc.strerror or exc}); check its permissions.") from None
        if magic != GGUF_MAGIC:
            raise FormatError(
                f"{p}: not a GGUF file (it does not start with 'GGUF'); pass a .gguf or .safetensors model."
            )
        try:
            reader = gguf.GGUFReader(str(p), "r")
        except ValueError as exc:
            if "GGMLQuantizationType" in str(exc):
                raise FormatError(
                    f"{p}: a tensor uses a quantization type the installed gguf package {gguf_version()} does not know "
                    f"({exc}); upgrade it (`pip install -U gguf`) or re-quantize the model to a known type."
                ) from None
            raise FormatError(
                f"{p}: truncated or corrupt GGUF file (the gguf reader failed: {exc}); re-download or re-convert it."
            ) from None
        except Exception as exc:  # the reader indexes into the memory map: any error means a broken file
            raise FormatError(
                f"{p}: not a readable GGUF file ({type(exc).__name__}: {exc}); re-download or re-convert it."
            ) from None
        self._reader = reader
        self.architecture = _string_field(reader, "general.architecture")
        if self.architecture in TEXT_ARCHITECTURES:
            raise FormatError(
                f"{p}: a text-encoder GGUF (architecture {self.architecture!r}); pass the diffusion model the LoRA "
                "was trained on."
            )
        tensors = {t.name: t for t in reader.tensors}
        if any(n.startswith(CHECKPOINT_PREFIX) for n in tensors):
            tensors = {n[len(CHECKPOINT_PREFIX) :]: t for n, t in tensors.items() if n.startswith(CHECKPOINT_PREFIX)}
        self._tensors = tensors
        shapes = {name: self._orig_shape(t) for name, t in tensors.items()}
        self.quant_types: dict[str, int] = {}
        for t in tensors.values():
            self.quant_types[t.tensor_type.name] = self.quant_types.get(t.tensor_type.name, 0) + 1
        metadata = {"gguf.architecture": self.architecture or "", "gguf.quant_types": _types_text(self.quant_types)}
        super().__init__(p, shapes, metadata)
        self._data_start = int(reader.data_offset)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = sampled_fingerprint(self.path, self._data_start)
        return self._fingerprint

    def _orig_shape(self, tensor: Any) -> tuple[int, ...]:
        field = self._reader.get_field(ORIG_SHAPE_KEY.format(tensor.name))
        if field is not None:
            try:
                return tuple(int(v) for v in field.contents())
            except (TypeError, ValueError):
                raise FormatError(
                    f"{self.path}: metadata {ORIG_SHAPE_KEY.format(tensor.name)!r} is not a list of integers; "
                    "the file is malformed. Re-convert it."
                ) from None
        return tuple(int(v) for v in reversed(tensor.shape))

    def _read(self, view: FileTensor, shape: tuple[int, ...]) -> torch.Tensor:
        gguf = _gguf()
        tensor = self._tensors[view.name]
        data = tensor.data  # a view of the memory map: nothing is read until it is sliced below
        full = self._shapes[view.name]
        # Row slices of fused 2-D weights (Flux qkv): GGUF quantises along rows, so rows
        # [start, start + rows) are the same rows of the raw block data.
        rows_apart = view.rows is not None and data.ndim == 2 and data.shape[0] == full[0]
        if rows_apart:
            data = data[view.start : view.start + view.rows]  # type: ignore[operator]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numpy: the memory map is read-only
                values = gguf.quants.dequantize(data, tensor.tensor_type)
        except NotImplementedError:
            raise FormatError(
                f"{self.path}: tensor {view.name!r} is {tensor.tensor_type.name}, which the installed gguf package "
                f"{gguf_version()} cannot dequantise; upgrade it (`pip install -U gguf`) or use another quantization."
            ) from None
        except (ValueError, IndexError) as exc:
            raise FormatError(
                f"{self.path}: tensor {view.name!r} ({tensor.tensor_type.name}) could not be dequantised ({exc}); "
                "the file may be corrupt. Re-download or re-convert it."
            ) from None
        out = torch.from_numpy(values.astype("float32", copy=True))
        if view.rows is not None and not rows_apart:
            return out.reshape(full)[view.start : view.start + view.rows].contiguous()
        return out.reshape(shape)


def _string_field(reader: Any, name: str) -> str | None:
    field = reader.get_field(name)
    if field is None:
        return None
    value = field.contents()
    return value if isinstance(value, str) else None


def _types_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} ({n})" for name, n in sorted(counts.items()))


def gguf_version() -> str:
    """The installed gguf package's version (for messages)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(version unknown)"
