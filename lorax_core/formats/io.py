"""Safe ``.safetensors`` reading and atomic writing, with string metadata.

Reading validates the header ourselves before handing the file to ``safetensors`` so that any
corrupt, truncated or non-safetensors file fails with one :class:`~lorax_core.errors.FormatError`
naming the file (the safetensors format: an 8-byte little-endian header length, a JSON header
``{name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}``, then the tensor bytes).
Pickle-based files are refused with :class:`~lorax_core.errors.UnsafeFileError`: unpickling runs
arbitrary code from the file.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import struct
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..errors import FormatError, NonFiniteError, OutputError, OutputExistsError, UnsafeFileError
from ..quant import nonfinite_count

__all__ = [
    "PICKLE_SUFFIXES",
    "check_output_path",
    "load_tensors",
    "read_header",
    "refuse_pickle",
    "same_path",
    "save_tensors",
    "serialize_tensors",
    "write_files",
    "write_text",
]

PICKLE_SUFFIXES: tuple[str, ...] = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# Sanity limit on the JSON header: real headers are a few MB at most (one entry per tensor).
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# A header is {name: {"dtype", "shape": [...], "data_offsets": [...]}}: 3 levels. Anything much
# deeper is not a safetensors header, and refusing it early keeps json.loads' recursion shallow.
_MAX_HEADER_DEPTH = 8
# No diffusion-model or LoRA tensor has more than 5 dimensions (3-D convolutions); torch's own
# limits start well above this, so 8 refuses nothing real.
_MAX_DIMS = 8
_MAX_DIM = 2**63 - 1  # torch sizes are int64 (safetensors: usize)
# Temporary files of the writer: a short, fixed-length name (a final name near the 255-byte
# limit must not fail because of its temporary), hidden, and recognisable so that the ones a
# killed process left behind can be removed by the next write into the same folder.
_TEMP_PREFIX = ".lorax-tmp-"
_TEMP_SUFFIX = ".tmp"
_STALE_TEMP_SECONDS = 3600
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

    Admits exactly what ``safetensors`` itself admits, and a little less: every entry has a
    known dtype *name*, a shape of at most :data:`_MAX_DIMS` non-negative integers, and a byte
    range of the right size; the ranges tile the data section without overlap, gap or
    trailing bytes; metadata is a string → string map; no name appears twice; the JSON is
    nested at most :data:`_MAX_HEADER_DEPTH` levels (a real header has 3). So a file read here
    never reaches ``safetensors`` or ``torch`` with a structure they reject with their own
    exceptions.

    Args:
        path: the file.

    Returns:
        ``(entries, metadata)``: ``{tensor name: {"dtype", "shape", "data_offsets"}}`` and the
        string metadata (empty when the file has none).

    Raises:
        FormatError: missing file, a directory, a pickle file (:class:`UnsafeFileError`), or a
            header that is truncated, not JSON, too deeply nested, or describes bytes the file
            does not have or does not use.
    """
    p = Path(path)
    refuse_pickle(p)
    try:
        if not p.exists():
            raise FormatError(f"{p}: no such file; check the path.")
        if not p.is_file():
            raise FormatError(f"{p}: not a file; pass a .safetensors file.")
        size = p.stat().st_size
        with p.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise FormatError(
                    f"{p}: not a safetensors file (only {size} bytes, shorter than the 8-byte header size)."
                )
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > _MAX_HEADER_BYTES or 8 + n > size:
                raise FormatError(
                    f"{p}: not a safetensors file, or truncated: the header claims {n} bytes but the file has {size}. "
                    "Re-download or re-save the file."
                )
            raw = fh.read(n)
    except OSError as exc:  # permission denied, a name too long, an I/O error…
        raise FormatError(
            f"{p}: cannot read the file ({exc.strerror or exc}); check the path and its permissions."
        ) from None
    header = _parse_header_json(p, raw)
    metadata_raw = header.pop("__metadata__", None)
    metadata = _check_metadata(p, metadata_raw)
    data_size = size - 8 - n
    for name, entry in header.items():
        _check_entry(p, name, entry, data_size)
    _check_layout(p, header, data_size)
    return header, metadata


def _parse_header_json(p: Path, raw: bytes) -> dict[str, object]:
    """The header's JSON object; every way it can be malformed is one :class:`FormatError`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{p}: corrupt safetensors header (not valid JSON: {exc}). Re-download the file.") from None
    # Checked before json.loads, which recurses once per level: a header nested 100 000 deep
    # would end in a RecursionError there (or, called from an already deep stack, sooner).
    depth = _nesting_depth(raw)
    if depth > _MAX_HEADER_DEPTH:
        raise FormatError(
            f"{p}: corrupt safetensors header: JSON nested {depth} levels deep (a safetensors header has 3, "
            f"this reader allows {_MAX_HEADER_DEPTH}). Re-download or re-save the file."
        )
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_refuse_constant)
    except _DuplicateKeyError as exc:
        raise FormatError(
            f"{p}: corrupt safetensors header: the name {_brief(exc.key)} appears twice. Re-download or re-save the file."
        ) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, and integers longer than Python converts
        raise FormatError(f"{p}: corrupt safetensors header (not valid JSON: {exc}). Re-download the file.") from None
    if not isinstance(header, dict):
        raise FormatError(f"{p}: corrupt safetensors header (a JSON {type(header).__name__}, not an object).")
    return header


def _refuse_constant(token: str) -> object:
    # Python's json reads NaN/Infinity; they are not JSON, and safetensors' parser refuses them.
    raise ValueError(f"{token} is not a JSON value")


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json.loads keeps the last of two equal names silently; safetensors would see one tensor
    # where the file describes two, so a repeated name is a corrupt header.
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


_JSON_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_JSON_STRING = re.compile(rb'"[^"]*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _nesting_depth(raw: bytes) -> int:
    """How deep the JSON text's brackets nest (the deepest point of a prefix when unbalanced).

    Linear-time and recursion-free: drop escapes and strings, keep only the brackets, peel the
    innermost ``[]``/``{}`` pairs a few times (enough for every real header), and count the
    rest with a running sum.
    """
    structure = _JSON_STRING.sub(b"", _JSON_ESCAPE.sub(b"", raw)).translate(None, _NOT_BRACKETS)
    peeled = 0
    while structure and peeled <= _MAX_HEADER_DEPTH:
        shorter = structure.replace(b"[]", b"").replace(b"{}", b"")
        if shorter == structure:
            break
        structure, peeled = shorter, peeled + 1
    if not structure:
        return peeled
    deepest, level = 0, 0
    chunk = 1 << 20
    for i in range(0, len(structure), chunk):
        part = torch.frombuffer(bytearray(structure[i : i + chunk]), dtype=torch.uint8)
        opens = (part == ord("[")) | (part == ord("{"))
        running = level + torch.where(opens, 1, -1).cumsum(0)
        deepest = max(deepest, int(running.max()))
        level = int(running[-1])
    return peeled + deepest


def _check_metadata(p: Path, metadata: object) -> dict[str, str]:
    """The ``__metadata__`` string map (safetensors accepts nothing else)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise FormatError(
            f"{p}: corrupt safetensors metadata: expected a map of strings, got {_brief(metadata)}. "
            "Re-save the file with string metadata."
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise FormatError(
                f"{p}: corrupt safetensors metadata: the value of {_brief(key)} is {_brief(value)}, not a string "
                "(safetensors itself refuses such files). Re-save the file with string metadata."
            )
    return dict(metadata)


def _brief(value: object, limit: int = 60) -> str:
    """A short description of a JSON value for a message (never huge, never recursive)."""
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    if isinstance(value, list):
        if len(value) <= _MAX_DIMS and all(_is_scalar(v) for v in value):
            text = "[" + ", ".join(_brief(v, 24) for v in value) + "]"
            return text if len(text) <= limit else f"a list of {len(value)} items"
        return f"a list of {len(value)} items"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**24:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry(p: Path, name: str, entry: object, data_size: int) -> None:
    """Validate one header entry against the file's data size (protects against truncation)."""
    if not isinstance(entry, dict):
        raise FormatError(f"{p}: corrupt safetensors header: entry {_brief(name, 80)} is not an object.")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise FormatError(
            f"{p}: corrupt safetensors header: tensor {_brief(name, 80)} has dtype {_brief(dtype)}, not a dtype name such "
            "as 'F16'. Re-download or re-save the file."
        )
    if dtype not in _DTYPE_BYTES:
        raise FormatError(
            f"{p}: tensor {_brief(name, 80)} has unsupported dtype {_brief(dtype)}. Known dtypes: {', '.join(_DTYPE_BYTES)}."
        )
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(
            f"{p}: corrupt safetensors header: tensor {_brief(name, 80)} has shape {_brief(shape)}; a shape is a list of "
            "non-negative integers. Re-download or re-save the file."
        )
    if len(shape) > _MAX_DIMS or any(d > _MAX_DIM for d in shape):
        raise FormatError(
            f"{p}: corrupt safetensors header: tensor {_brief(name, 80)} has shape {_brief(shape)} "
            f"(more than {_MAX_DIMS} dimensions or a dimension above 2**63 - 1). Re-download or re-save the file."
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise FormatError(
            f"{p}: corrupt safetensors header: tensor {_brief(name, 80)} has data_offsets {_brief(offsets)}; expected "
            "[start, end]. Re-download or re-save the file."
        )
    start, end = offsets
    nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]
    if start < 0 or end < start or end - start != nbytes or end > data_size:
        raise FormatError(
            f"{p}: truncated or corrupt: tensor {_brief(name, 80)} needs bytes {_brief(start)}..{_brief(end)} "
            f"({_brief(nbytes)} for shape {_brief(shape)}) but the file holds {data_size} data bytes. "
            "Re-download or re-save the file."
        )


def _check_layout(p: Path, header: Mapping[str, object], data_size: int) -> None:
    """The tensors' byte ranges must tile the data section exactly, as safetensors requires.

    Overlapping, repeated or gapped ranges, or bytes after the last tensor, mean a damaged or
    forged file: two names reading the same bytes, or data no tensor accounts for.
    """
    ranges = sorted(
        (int(entry["data_offsets"][0]), int(entry["data_offsets"][1]), name)  # type: ignore[index]
        for name, entry in header.items()
    )
    expected, previous = 0, None
    for start, end, name in ranges:
        if start < expected:
            raise FormatError(
                f"{p}: corrupt safetensors header: tensor {_brief(name, 80)} (bytes {start}..{end}) overlaps tensor "
                f"{_brief(previous, 80)} (which ends at byte {expected}); safetensors refuses such files. "
                "Re-download or re-save the file."
            )
        if start > expected:
            where = f"after tensor {_brief(previous, 80)}" if previous is not None else "before the first tensor"
            raise FormatError(
                f"{p}: corrupt safetensors header: data bytes {expected}..{start} {where} belong to no tensor; "
                "safetensors refuses such files. Re-download or re-save the file."
            )
        expected, previous = end, name
    if expected != data_size:
        raise FormatError(
            f"{p}: corrupt safetensors file: {data_size - expected} bytes after the last tensor belong to no tensor; "
            "safetensors refuses such files. Re-download or re-save the file."
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


def check_output_path(
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    folder: Path | None = None,
    suffix: str | None = ".safetensors",
) -> Path:
    """Validate an output path before any work is done.

    Args:
        path: where the file will be written.
        overwrite: allow replacing an existing file.
        folder: when given, ``path`` must stay inside it after resolving ``..`` and links
            (used when a name comes from a user in a host such as ComfyUI).
        suffix: the required suffix (``None``: any, for text outputs such as reports).

    Returns:
        The path as a :class:`Path`.

    Raises:
        OutputError: wrong suffix, a name that escapes ``folder`` or is too long, a missing
            parent folder, or a folder (or other non-file) where the file should go.
        OutputExistsError: something exists at the path (even a dangling symbolic link) and
            ``overwrite`` is false.
    """
    p = Path(path)
    if suffix is not None and p.suffix.lower() != suffix:
        raise OutputError(f"{p}: output files are written as {suffix}; use a name ending in {suffix}.")
    try:
        if folder is not None:
            root = Path(folder).resolve()
            target = (root / p).resolve() if not p.is_absolute() else p.resolve()
            if root != target.parent and root not in target.parents:
                raise OutputError(f"{p}: the output name escapes its folder {root}; use a plain file name inside it.")
            p = target
        _check_name_length(p)
        if not p.parent.is_dir():
            raise OutputError(f"{p}: the folder {p.parent} does not exist; create it first.")
        if p.is_dir():
            raise OutputError(
                f"{p}: is a folder; give a file name inside it, e.g. {p / ('out' + (suffix or '.json'))}."
            )
        if os.path.lexists(p):
            if not overwrite:
                what = "a dangling symbolic link" if p.is_symlink() and not p.exists() else "the file"
                raise OutputExistsError(f"{p}: {what} already exists; choose another name or {OutputExistsError.FIX}.")
            if p.exists() and not p.is_file():
                raise OutputError(f"{p}: not a regular file (a device, pipe or socket); choose another name.")
    except OSError as exc:  # a name the OS refuses, a symlink loop, permissions on a parent…
        raise _write_failure(p, exc) from None
    return p


def _check_name_length(p: Path) -> None:
    limit = 255
    try:
        limit = os.pathconf(p.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such folder yet, or no pathconf (Windows)
        pass
    size = len(os.fsencode(p.name))
    if size > limit:
        raise OutputError(
            f"{p}: the file name is too long ({size} bytes; this folder allows {limit}); choose a shorter name."
        )


def _write_failure(path: Path, exc: OSError) -> OutputError:
    """One clear message for an operating-system error while writing ``path``."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC or exc.errno == getattr(errno, "EDQUOT", None):
        fix = "free some space or choose another folder"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = f"choose a folder you can write to (not {path.parent})"
    elif exc.errno == errno.ENAMETOOLONG:
        fix = "choose a shorter name or a shorter folder path"
    elif exc.errno in (errno.EISDIR, errno.ENOTDIR):
        fix = "check that the path names a file inside an existing folder"
    else:
        fix = "check the folder and try again"
    return OutputError(f"{path}: could not write the file ({reason}); {fix}. Nothing was written.")


def serialize_tensors(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *, path: str | os.PathLike[str]
) -> bytes:
    """The bytes of a safetensors file holding ``tensors`` (CPU, contiguous) and string ``metadata``.

    Serialising in memory, rather than ``safetensors.torch.save_file``, keeps safetensors'
    own temporary file out of the output folder; the caller writes the bytes atomically.

    Raises:
        FormatError: non-string metadata.
        NonFiniteError: a floating-point tensor holds NaN or ±Inf (the last check before any
            write: no output file ever holds one).
    """
    from safetensors.torch import save

    p = Path(path)
    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise FormatError(f"{p}: safetensors metadata must be strings; keys {bad[:5]} are not.")
    payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    for key, tensor in payload.items():
        count = nonfinite_count(tensor)  # fp8 (an fp8 LoRA's own dtype) is checked on a float32 copy
        if count:
            raise NonFiniteError(
                f"{p}: refusing to write tensor {key!r}: {count} of its {tensor.numel()} values are NaN or Inf "
                "(an overflow or corrupt input upstream). Nothing was written; check the layer's factors."
            )
    return save(payload, metadata=meta or None)


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
    folder: Path | None = None,
    extra_files: Mapping[str | os.PathLike[str], str] | None = None,
) -> Path:
    """Write tensors atomically, together with optional text files (both or neither).

    The file is serialised in memory (:func:`serialize_tensors`), every output is written to a
    temporary file in its own folder and then renamed into place (:func:`write_files`): a crash
    never leaves a half-written output under a final name, readers see the old file or the new
    one, and a failure leaves no temporary file behind.

    Args:
        path: output ``.safetensors`` path (see :func:`check_output_path`).
        tensors: ``{key: tensor}``; written contiguous, in their dtype, from CPU copies.
        metadata: string metadata; non-string values are rejected.
        overwrite: replace existing files.
        folder: confine ``path`` to this folder.
        extra_files: ``{path: text}`` written with the tensors, e.g. a JSON report; any suffix.

    Returns:
        The final path.

    Raises:
        FormatError: non-string metadata values.
        OutputError: see :func:`check_output_path`; also a write that fails (disk full, a
            read-only folder…) and an extra file at the same path as the tensors.
        OutputExistsError: an output exists and ``overwrite`` is false.
        NonFiniteError: a tensor holds NaN or Inf.
    """
    p = check_output_path(path, overwrite=overwrite, folder=folder)
    outputs: list[tuple[Path, bytes]] = []
    for extra, text in (extra_files or {}).items():
        q = check_output_path(extra, overwrite=overwrite, suffix=None)
        if same_path(q, p) or any(same_path(q, o) for o, _ in outputs):
            raise OutputError(f"{q}: given twice as an output (also for {p}); give each output its own name.")
        outputs.append((q, text.encode("utf-8")))
    data = serialize_tensors(tensors, metadata, path=p)
    write_files([(p, data), *outputs], overwrite=overwrite)
    return p


def write_text(path: str | os.PathLike[str], text: str, *, overwrite: bool = False) -> Path:
    """Write a UTF-8 text file atomically (see :func:`write_files`). Raises as :func:`check_output_path`."""
    p = check_output_path(path, overwrite=overwrite, suffix=None)
    write_files([(p, text.encode("utf-8"))], overwrite=overwrite)
    return p


def same_path(a: Path, b: Path) -> bool:
    """Whether two paths name one file (after ``..``, symbolic links and case folding); neither need exist."""
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def write_files(files: Sequence[tuple[Path, bytes]], *, overwrite: bool = False, sync: bool = True) -> None:
    """Publish several files atomically and together: all of them or none.

    Each file is written to a temporary file in its own folder (``.lorax-tmp-*.tmp``, created
    with mode ``0o666`` so the user's umask applies, then ``fsync``-ed); only when every one is
    written are they moved to their final names, without replacing anything unless
    ``overwrite`` (a hard link, which fails if the name exists, with a check-then-rename
    fallback on file systems without links). If a later move fails, the files already moved
    are removed again, and with ``overwrite`` the files they replaced are put back (each is
    kept under a temporary name until every move succeeded), so a failed ``--overwrite`` never
    costs the user the LoRA they had. Temporary files are removed on every failure; those a
    killed process left behind are removed by a later write into the same folder once they
    are an hour old.

    ``sync=False`` skips the ``fsync``: for files whose loss in a crash costs nothing (the
    subspace cache checksums its entries and recomputes a damaged one).

    Raises:
        OutputError: the operating system refused a write (the message names the file, the
            reason and the fix; nothing is left behind).
        OutputExistsError: a final name exists and ``overwrite`` is false.
    """
    temps: list[Path] = []
    published: list[Path] = []
    backups: dict[Path, Path] = {}  # final name → the file it held before (overwrite only)
    current = files[0][0] if files else Path()
    finished = False
    try:
        for path, data in files:
            current = path
            _sweep_stale_temps(path.parent)
            tmp = _temp_name(path)
            temps.append(tmp)
            fd = _create(tmp)
            try:
                _write_all(fd, data)
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        for (path, _), tmp in zip(files, temps, strict=True):
            current = path
            if overwrite and path.is_file():
                backups[path] = _keep_aside(path)
            _publish(tmp, path, overwrite)
            published.append(path)
        finished = True
    except OSError as exc:
        raise _write_failure(current, exc) from None
    finally:
        if not finished:
            # Both or neither: a report without its LoRA (or the reverse) is not left behind,
            # and what an overwrite replaced comes back.
            for path in published:
                _remove_quietly(path)
            for path, backup in backups.items():
                _restore_quietly(backup, path)
        for backup in backups.values():
            _remove_quietly(backup)
        for tmp in temps:
            _remove_quietly(tmp)


def _temp_name(path: Path) -> Path:
    """A fresh temporary name next to ``path`` (swept by :func:`_sweep_stale_temps` if left behind)."""
    return path.parent / f"{_TEMP_PREFIX}{secrets.token_hex(8)}{_TEMP_SUFFIX}"


def _keep_aside(path: Path) -> Path:
    """A second name for the existing file at ``path``, so a failed overwrite can put it back.

    A hard link keeps ``path`` itself in place (no moment without it); where links are not
    supported the file is renamed aside instead.
    """
    backup = _temp_name(path)
    try:
        os.link(path, backup)
    except OSError:
        path.replace(backup)
    return backup


def _restore_quietly(backup: Path, path: Path) -> None:
    """Put a kept-aside file back at ``path`` (best effort: this runs while handling another error)."""
    try:
        backup.replace(path)
    except OSError:
        pass


def _create(path: Path) -> int:
    """A new file opened for writing; mode 0o666 less the umask, like any file a user's tool creates."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (it may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _publish(tmp: Path, final: Path, overwrite: bool) -> None:
    if overwrite:
        tmp.replace(final)  # atomic within one folder; replaces a symbolic link, not its target
        return
    try:
        os.link(tmp, final)  # atomic and never replaces: fails if anything (even a dangling link) is there
    except FileExistsError:
        raise OutputExistsError(
            f"{final}: the file already exists; choose another name or {OutputExistsError.FIX}."
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        # File systems without hard links (FAT, some network shares): check, then rename.
        if os.path.lexists(final):
            raise OutputExistsError(
                f"{final}: the file already exists; choose another name or {OutputExistsError.FIX}."
            ) from None
        tmp.replace(final)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # best effort: the original error is the one to report


def _sweep_stale_temps(folder: Path) -> None:
    """Remove this writer's temporary files that a killed process left in ``folder``."""
    cutoff = time.time() - _STALE_TEMP_SECONDS
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if not (entry.name.startswith(_TEMP_PREFIX) and entry.name.endswith(_TEMP_SUFFIX)):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                Path(entry.path).unlink()
        except OSError:
            pass  # another writer removed it first, or it is not ours to remove
