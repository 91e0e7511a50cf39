"""Safe ``.safetensors`` reading and atomic writing, with string metadata.

Reading validates the header ourselves before handing the file to ``safetensors`` so that any
corrupt, truncated or non-safetensors file fails with one :class:`~lorax_core.errors.FormatError`
naming the file (the safetensors format: an 8-byte little-endian header length, a JSON header
``{name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}``, then the tensor bytes).
Pickle-based files are refused with :class:`~lorax_core.errors.UnsafeFileError`: unpickling runs
arbitrary code from the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import FormatError, OutputExistsError, UnsafeFileError

__all__ = [
    "PICKLE_SUFFIXES",
    "TOOL_NAME",
    "TOOL_VERSION",
    "check_output_path",
    "load_tensors",
    "read_header",
    "refuse_pickle",
    "save_tensors",
]

TOOL_NAME = "lorax_core"
# The version written into every output's metadata (``lorax.tool_version``); kept in step with
# pyproject.toml's [project] version.
TOOL_VERSION = "0.1.0"

PICKLE_SUFFIXES: tuple[str, ...] = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# Sanity limit on the JSON header: real headers are a few MB at most (one entry per tensor).
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
#: safetensors dtype names → torch dtypes (the one table; ``read_header`` only admits these names).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32, "I64": torch.int64,
    "U64": torch.uint64, "F64": torch.float64,
}  # fmt: skip


def refuse_pickle(path: Path) -> None:
    """Raise :class:`UnsafeFileError` if ``path`` is a pickle-based checkpoint (by suffix).

    Raises:
        UnsafeFileError: for ``.ckpt/.pt/.pth/.bin/.pkl``, with how to convert the file.
    """
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFileError(
            f"{path}: {path.suffix} files are Python pickles, and loading one runs any code stored in it, "
            "so lorax_core refuses them. Convert it once with a tool you trust, e.g. "
            "`python -c \"import torch, safetensors.torch as st; sd = torch.load('in.ckpt', weights_only=True); "
            "st.save_file({k: v.contiguous() for k, v in sd.get('state_dict', sd).items()}, 'out.safetensors')\"`, "
            "and pass the .safetensors file."
        )


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, dict[str, object]], dict[str, str]]:
    """Read and validate a safetensors header without reading any tensor data.

    Args:
        path: the file.

    Returns:
        ``(entries, metadata)``: ``{tensor name: {"dtype", "shape", "data_offsets"}}`` and the
        string metadata (empty when the file has none).

    Raises:
        FormatError: missing file, a directory, a pickle file (:class:`UnsafeFileError`), or a
            header that is truncated, not JSON, or describes bytes the file does not have.
    """
    p = Path(path)
    refuse_pickle(p)
    if not p.exists():
        raise FormatError(f"{p}: no such file; check the path.")
    if not p.is_file():
        raise FormatError(f"{p}: not a file; pass a .safetensors file.")
    size = p.stat().st_size
    with p.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise FormatError(f"{p}: not a safetensors file (only {size} bytes, shorter than the 8-byte header size).")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_HEADER_BYTES or 8 + n > size:
            raise FormatError(
                f"{p}: not a safetensors file, or truncated: the header claims {n} bytes but the file has {size}. "
                "Re-download or re-save the file."
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{p}: corrupt safetensors header (not valid JSON: {exc}). Re-download the file.") from None
    if not isinstance(header, dict):
        raise FormatError(f"{p}: corrupt safetensors header (a JSON {type(header).__name__}, not an object).")
    metadata_raw = header.pop("__metadata__", None) or {}
    if not isinstance(metadata_raw, dict):
        raise FormatError(f"{p}: corrupt safetensors metadata (expected a string map).")
    metadata = {str(k): str(v) for k, v in metadata_raw.items()}
    data_size = size - 8 - n
    for name, entry in header.items():
        _check_entry(p, name, entry, data_size)
    return header, metadata


def _check_entry(p: Path, name: str, entry: object, data_size: int) -> None:
    """Validate one header entry against the file's data size (protects against truncation)."""
    if not isinstance(entry, dict):
        raise FormatError(f"{p}: corrupt safetensors header: entry {name!r} is not an object.")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPE_BYTES:
        raise FormatError(f"{p}: tensor {name!r} has unsupported dtype {dtype!r}.")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise FormatError(f"{p}: corrupt safetensors header: tensor {name!r} has shape {shape!r}.")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise FormatError(f"{p}: corrupt safetensors header: tensor {name!r} has data_offsets {offsets!r}.")
    start, end = offsets
    nbytes = math.prod(shape) * _DTYPE_BYTES[str(dtype)]
    if start < 0 or end < start or end - start != nbytes or end > data_size:
        raise FormatError(
            f"{p}: truncated or corrupt: tensor {name!r} needs bytes {start}..{end} ({nbytes} for shape {shape}) "
            f"but the file holds {data_size} data bytes. Re-download or re-save the file."
        )


def load_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor of a (small) safetensors file onto the CPU.

    Meant for LoRA files (a few MB to a few hundred MB); models are read lazily by
    :mod:`lorax_core.modelio` instead.

    Returns:
        ``({name: tensor}, metadata)`` with tensors in their stored dtype, on CPU.

    Raises:
        FormatError: as :func:`read_header`, or if safetensors itself rejects the file.
    """
    from safetensors import safe_open

    p = Path(path)
    header, metadata = read_header(p)
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(p), framework="pt", device="cpu") as handle:
            for name in header:
                tensors[name] = handle.get_tensor(name)
    except Exception as exc:  # safetensors raises its own SafetensorError and also OSError/ValueError
        raise FormatError(f"{p}: could not read safetensors data ({exc}). Re-download or re-save the file.") from None
    return tensors, metadata


def check_output_path(path: str | os.PathLike[str], *, overwrite: bool = False, folder: Path | None = None) -> Path:
    """Validate an output path before any work is done.

    Args:
        path: where the file will be written; must end in ``.safetensors``.
        overwrite: allow replacing an existing file.
        folder: when given, ``path`` must stay inside it after resolving ``..`` and links
            (used when a name comes from a user in a host such as ComfyUI).

    Returns:
        The path as a :class:`Path`.

    Raises:
        FormatError: wrong suffix, a name that escapes ``folder``, or a missing parent folder.
        OutputExistsError: the file exists and ``overwrite`` is false.
    """
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise FormatError(f"{p}: output files are written as .safetensors; use a name ending in .safetensors.")
    if folder is not None:
        root = Path(folder).resolve()
        target = (root / p).resolve() if not p.is_absolute() else p.resolve()
        if root != target.parent and root not in target.parents:
            raise FormatError(f"{p}: the output name escapes its folder {root}; use a plain file name inside it.")
        p = target
    if not p.parent.is_dir():
        raise FormatError(f"{p}: the folder {p.parent} does not exist; create it first.")
    if p.exists() and not overwrite:
        raise OutputExistsError(f"{p}: the file already exists; choose another name or allow overwriting.")
    return p


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
    folder: Path | None = None,
) -> Path:
    """Write tensors atomically: a temporary file in the same folder, then ``os.replace``.

    A crash never leaves a half-written output under the final name, and readers see either
    the old file or the new one.

    Args:
        path: output ``.safetensors`` path (see :func:`check_output_path`).
        tensors: ``{key: tensor}``; written contiguous, in their dtype, from CPU copies.
        metadata: string metadata; non-string values are rejected.
        overwrite: replace an existing file.
        folder: confine ``path`` to this folder.

    Returns:
        The final path.

    Raises:
        FormatError, OutputExistsError: see :func:`check_output_path`; FormatError also for
            non-string metadata values.
    """
    from safetensors.torch import save_file

    p = check_output_path(path, overwrite=overwrite, folder=folder)
    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise FormatError(f"{p}: safetensors metadata must be strings; keys {bad[:5]} are not.")
    payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(payload, str(tmp), metadata=meta)
        # Re-check just before the rename: another process may have created the file meanwhile.
        if p.exists() and not overwrite:
            raise OutputExistsError(f"{p}: the file already exists; choose another name or allow overwriting.")
        tmp.replace(p)  # os.replace: atomic within one folder
    finally:
        if tmp.exists():
            tmp.unlink()
    return p
