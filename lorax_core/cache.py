"""Subspace cache: compute each top-R singular basis once per (model, layer, R, method).

Transferring a LoRA needs the top-R singular subspaces of the source and the target base
weight of every layer it touches (LoRA-X, arXiv 2501.16559, Eq. 3; ProLoRA, arXiv
2506.04244). Those SVDs are by far the most expensive step, and they depend only on the
base models, not on the LoRA: a user moving ten LoRAs onto a new base pays for them once.

Three implementations of the :class:`SubspaceCache` protocol:

* :class:`NullCache` always computes (the ``--no-cache`` / node "bypass cache" choice;
  passing ``cache=None`` to the core means the same).
* :class:`MemoryCache` is a bounded in-process LRU, optionally in front of another cache.
* :class:`DiskCache` keeps entries as small safetensors files in one directory, bounded in
  total size with least-recently-used eviction, checksummed (a corrupt or truncated entry is
  deleted and recomputed, never trusted), and safe when several processes share the
  directory (each write goes to a temporary file in the same directory and is published
  with an atomic :func:`os.replace`; readers treat a vanished file as a miss).

Storage precision: ``U`` and ``V`` have orthonormal columns, entries bounded by 1, so
float16 keeps them to a relative rounding error of about ``2⁻¹¹ ≈ 4.9e-4`` per entry with no
overflow risk; ``S`` is always stored in float32 because singular values of a base weight
can exceed float16's range. The measured effect of float16 storage on the subspace and on a
transferred ΔW is ≈ 3e-4 and ≈ 4e-4 relative (``benchmarks/results/PERF.md``; bounded at 1e-3
in ``tests/perf/test_perf_cache.py``), about twice the rounding of a float16 LoRA file itself.
Pass ``storage_dtype=torch.float32`` for bit-exact entries at twice the size.

Values returned from a *hit* are float32 tensors on the CPU; callers move them to their
compute device. A *miss* returns exactly what ``compute`` returned (no rounding), so the first
run of a transfer is never less accurate than an uncached one.

Precomputed entries (:class:`WritableSubspaceCache`): ``lookup`` answers without computing,
``contains`` says whether it would (without reading a file), and ``put`` stores a subspace
computed elsewhere (the batched GPU path, ``lorax_core.batched``).
Both, and ``get_or_compute``, take an optional ``method`` tag that replaces the cache's own
(:data:`DEFAULT_METHOD_TAG`) in the key, so entries of different algorithms never mix.
:meth:`DiskCache.put` hands the checksum and the write to one background thread; until the
file is written, lookups are answered from the queued (already storage-rounded) tensors, so a
put entry reads back the same whichever comes first. :meth:`DiskCache.flush` waits for the
queue; the writer is not a daemon thread, so the interpreter also waits for it at exit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from .errors import CacheError, OptionError, OutputError
from .formats.io import write_files
from .linalg import SUBSPACE_VERSION

if TYPE_CHECKING:
    from .linalg import Subspace

__all__ = [
    "DEFAULT_DISK_BYTES",
    "DEFAULT_MEMORY_BYTES",
    "DEFAULT_METHOD_TAG",
    "CacheStats",
    "DiskCache",
    "MemoryCache",
    "NullCache",
    "SubspaceCache",
    "WritableSubspaceCache",
    "default_cache_dir",
    "open_cache",
]

log = logging.getLogger(__name__)

#: Names the algorithm that produced an entry. Part of every key, and owned by ``linalg`` (which
#: changes it with any change to how ``top_subspace`` computes or sign-fixes a basis), so that
#: entries written by an older version are never mistaken for current ones.
DEFAULT_METHOD_TAG = SUBSPACE_VERSION

#: An SDXL source/target pair at R = 320 takes about 3.2 GB in float16 (700 attention and
#: feed-forward layers per model); the default keeps one such pair plus some headroom.
DEFAULT_DISK_BYTES = 8 * 1024**3
DEFAULT_MEMORY_BYTES = 256 * 1024**2

# Bumped when the on-disk layout changes; entries live in a sub-directory named after it,
# so ``clear`` never touches anything but our own files.
_FORMAT = "subspaces-v1"
_SUFFIX = ".safetensors"
_TMP_SUFFIX = ".tmp"
# A temporary file older than this was left by a crashed writer and may be removed.
_STALE_TMP_S = 3600.0
# Evict down to this fraction of the limit, so that a full cache is not rescanned on every write.
_LOW_WATER = 0.9
# Bound on the storage-dtype tensors queued for the background writer (DiskCache.put blocks
# beyond it): host memory stays small while the GPU produces entries faster than the disk takes them.
_PENDING_BYTES = 128 * 1024**2
_STORAGE_DTYPES = {torch.float16: "float16", torch.float32: "float32"}


@runtime_checkable
class SubspaceCache(Protocol):
    """Anything that can return the top-``rank`` subspace of one layer of one model.

    ``fingerprint`` identifies the model's weights (``WeightSource.fingerprint``), ``key``
    the layer (a model key), ``rank`` the requested R (before any per-layer clipping).
    ``compute`` is called, with no arguments, only when the cache cannot answer.
    """

    def get_or_compute(self, fingerprint: str, key: str, rank: int, compute: Callable[[], Subspace]) -> Subspace: ...


@runtime_checkable
class WritableSubspaceCache(SubspaceCache, Protocol):
    """A :class:`SubspaceCache` that also takes precomputed entries (all three classes here).

    ``method`` names the algorithm in the key; ``None`` means the cache's default
    (:data:`DEFAULT_METHOD_TAG`, i.e. :func:`linalg.top_subspace`). An entry put under one
    method is never returned for another.
    """

    def get_or_compute(
        self, fingerprint: str, key: str, rank: int, compute: Callable[[], Subspace], *, method: str | None = None
    ) -> Subspace:
        """The entry, or ``compute()`` stored under this key."""
        ...

    def lookup(self, fingerprint: str, key: str, rank: int, *, method: str | None = None) -> Subspace | None:
        """The entry if the cache holds it, else ``None``; never computes."""
        ...

    def contains(self, fingerprint: str, key: str, rank: int, *, method: str | None = None) -> bool:
        """Whether :meth:`lookup` would find the entry, without reading it (a corrupt file still counts)."""
        ...

    def put(self, fingerprint: str, key: str, rank: int, sub: Subspace, *, method: str | None = None) -> None:
        """Store a subspace computed elsewhere (may complete in the background, see :meth:`flush`)."""
        ...

    def flush(self) -> None:
        """Return once every ``put`` is stored."""
        ...


@dataclass
class CacheStats:
    """Counters for one cache object (this process only)."""

    hits: int = 0
    misses: int = 0
    writes: int = 0
    corrupt: int = 0
    evicted: int = 0


class NullCache:
    """A cache that never stores anything: every call computes. Use it to bypass caching."""

    def __init__(self) -> None:
        self.stats = CacheStats()

    def get_or_compute(
        self, fingerprint: str, key: str, rank: int, compute: Callable[[], Subspace], *, method: str | None = None
    ) -> Subspace:
        self.stats.misses += 1
        return compute()

    def lookup(self, fingerprint: str, key: str, rank: int, *, method: str | None = None) -> Subspace | None:
        """Always ``None`` (a miss): nothing is ever kept."""
        self.stats.misses += 1
        return None

    def contains(self, fingerprint: str, key: str, rank: int, *, method: str | None = None) -> bool:
        """Always ``False``."""
        return False

    def put(self, fingerprint: str, key: str, rank: int, sub: Subspace, *, method: str | None = None) -> None:
        """Discards ``sub``: bypassing the cache means nothing is kept."""

    def flush(self) -> None:
        """Nothing is ever pending."""

    def clear(self) -> None:
        """Nothing to clear; present so every cache can be cleared the same way."""


def _nbytes(sub: Subspace) -> int:
    return sum(t.numel() * t.element_size() for t in (sub.U, sub.S, sub.V))


class MemoryCache:
    """A bounded least-recently-used cache in process memory, optionally backed by another cache.

    Entries are kept in their dtype on the CPU (a GPU run's entries leave device memory free).
    With ``backing`` set, a miss here
    asks the backing cache (e.g. a :class:`DiskCache`), which computes only if it misses too.

    Args:
        max_bytes: bound on the summed size of the held ``U``, ``S`` and ``V`` tensors. An
            entry larger than the bound is returned but not kept.
        backing: the cache to consult on a miss, or ``None`` to call ``compute`` directly.
    """

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BYTES, backing: SubspaceCache | None = None) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise OptionError(f"MemoryCache max_bytes must be a non-negative integer; got {max_bytes!r}.")
        self.max_bytes = max_bytes
        self.backing = backing
        self.stats = CacheStats()
        self._entries: OrderedDict[tuple[str, str, int, str | None], Subspace] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes currently held."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_compute(
        self, fingerprint: str, key: str, rank: int, compute: Callable[[], Subspace], *, method: str | None = None
    ) -> Subspace:
        ident = (fingerprint, key, int(rank), method)
        found = self._find(ident)
        if found is not None:
            return found
        # Computed outside the lock: an SVD takes seconds and must not serialise other threads.
        if method is None and self.backing is not None:
            sub = self.backing.get_or_compute(fingerprint, key, rank, compute)
        elif method is not None and isinstance(self.backing, WritableSubspaceCache):
            sub = self.backing.get_or_compute(fingerprint, key, rank, compute, method=method)
        else:  # no backing, or one that cannot tell methods apart (it would mix them)
            sub = compute()
        self._insert(ident, sub)
        return sub

    def lookup(self, fingerprint: str, key: str, rank: int, *, method: str | None = None) -> Subspace | None:
        """The held entry, else the backing cache's (then kept here too) if it can look up; never computes."""
        ident = (fingerprint, key, int(rank), method)
        found = self._find(ident)
        if found is None and isinstance(self.backing, WritableSubspaceCache):
            found = self.backing.lookup(fingerprint, key, rank, method=method)
            if found is not None:
                self._insert(ident, found)
        return found

    def contains(self, fingerprint: str, key: str, rank: int, *, method: str | None = None) -> bool:
        """Whether the entry is held here or (for a writable backing cache) there; counts nothing."""
        with self._lock:
            if (fingerprint, key, int(rank), method) in self._entries:
                return True
        return isinstance(self.backing, WritableSubspaceCache) and self.backing.contains(
            fingerprint, key, rank, method=method
        )

    def put(self, fingerprint: str, key: str, rank: int, sub: Subspace, *, method: str | None = None) -> None:
        """Keep ``sub`` (its dtype, on the CPU) and hand it to a writable backing cache."""
        self._insert((fingerprint, key, int(rank), method), sub)
        if isinstance(self.backing, WritableSubspaceCache):
            self.backing.put(fingerprint, key, rank, sub, method=method)

    def flush(self) -> None:
        """Flush the backing cache (nothing here is ever pending)."""
        if isinstance(self.backing, WritableSubspaceCache):
            self.backing.flush()

    def _find(self, ident: tuple[str, str, int, str | None]) -> Subspace | None:
        with self._lock:
            found = self._entries.get(ident)
            if found is not None:
                self._entries.move_to_end(ident)
                self.stats.hits += 1
            else:
                self.stats.misses += 1
            return found

    def _insert(self, ident: tuple[str, str, int, str | None], sub: Subspace) -> None:
        size = _nbytes(sub)
        if size > self.max_bytes:
            return
        # Held on the CPU: on a GPU host the device memory stays free for the models (ComfyUI's),
        # and callers move a hit to their device anyway (SubspaceProvider.get).
        sub = sub.to("cpu")
        with self._lock:
            if ident not in self._entries:
                self._entries[ident] = sub
                self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= _nbytes(old)
                self.stats.evicted += 1

    def clear(self) -> None:
        """Drop every in-memory entry (the backing cache is left alone)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0


class _CorruptEntryError(Exception):
    """Internal: an entry file failed validation (never escapes this module)."""


def _digest(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the metadata (minus the digest) and each tensor's name, dtype, shape and bytes.

    Hashing the *parsed* tensors, not the file's data section, also catches a damaged header
    that still parses (e.g. a dtype letter flipped from ``F16`` to ``I16``).
    """
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for name in ("U", "S", "V"):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def _read_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise _CorruptEntryError("shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise _CorruptEntryError("header length out of range")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _CorruptEntryError(f"header is not JSON: {exc}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise _CorruptEntryError("no metadata")
    return meta


class DiskCache:
    """Subspaces stored as checksummed safetensors files in one directory, with LRU eviction.

    Each entry is one file ``<directory>/subspaces-v1/<sha256 of the key>.safetensors``
    holding ``U`` ``(m, R)`` and ``V`` ``(n, R)`` in ``storage_dtype`` and ``S`` ``(R,)`` in
    float32, plus metadata naming the model fingerprint, layer key, R, method tag and a
    SHA-256 of all of it. Recency is the file's modification time, refreshed on every hit.

    Safety:

    * *Corruption*: any entry that is truncated, unparsable, for another key, of the wrong
      dtype or shape, or whose checksum does not match is deleted, counted in
      ``stats.corrupt``, logged, and recomputed.
    * *Concurrency*: writers publish with :func:`os.replace` from a temporary file in the same
      directory, so readers see either no file or a complete one; two processes computing
      the same entry both succeed (the last rename wins; both files are valid). A file that
      vanishes between listing and reading (evicted or cleared by another process) is a miss.
    * *Failures to write* (disk full, permissions changed) are logged and the computed value
      is returned: the cache only ever saves time, it never fails a transfer.
    * *Background writes*: :meth:`put` converts the entry to its storage dtype on the CPU at
      once and queues the checksum and the write for one writer thread (at most
      ``_PENDING_BYTES`` queued; ``put`` waits beyond that). Queued entries answer lookups
      in this process; :meth:`flush` waits for the queue, and the interpreter waits for the
      (non-daemon) writer at exit. Write failures there are logged warnings, as above.

    Args:
        directory: the cache root; created if missing. The CLI uses :func:`default_cache_dir`;
            the ComfyUI node passes a directory inside ComfyUI's user area.
        max_bytes: bound on the summed size of the entry files.
        storage_dtype: ``torch.float16`` (default; half the size, see the module docstring
            for the accuracy) or ``torch.float32`` (exact).
        method: the algorithm tag that is part of every key (:data:`DEFAULT_METHOD_TAG`).

    Raises:
        CacheError: the directory cannot be created or is not writable.
        OptionError: ``max_bytes`` is not a positive integer or ``storage_dtype`` is not
            float16/float32.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_DISK_BYTES,
        storage_dtype: torch.dtype = torch.float16,
        method: str = DEFAULT_METHOD_TAG,
    ) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise OptionError(f"DiskCache max_bytes must be a positive integer; got {max_bytes!r}.")
        if storage_dtype not in _STORAGE_DTYPES:
            raise OptionError(f"DiskCache storage_dtype must be torch.float16 or torch.float32; got {storage_dtype!r}.")
        self.root = Path(directory)
        self.directory = self.root / _FORMAT
        self.max_bytes = max_bytes
        self.storage_dtype = storage_dtype
        self.method = method
        self.stats = CacheStats()
        self._lock = threading.Lock()
        # Entries handed to put() and not yet written, in arrival order; guarded by _queue.
        self._pending: dict[Path, tuple[dict[str, str], dict[str, torch.Tensor]]] = {}
        self._pending_bytes = 0
        self._queue = threading.Condition()
        self._writer: threading.Thread | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(
                f"subspace cache directory {str(self.root)!r} cannot be created ({exc.strerror or exc}); "
                f"choose another directory or {CacheError.FIX}."
            ) from None
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise CacheError(
                f"subspace cache directory {str(self.directory)!r} is not writable; "
                f"fix its permissions, choose another directory, or {CacheError.FIX}."
            )

    # -- keys -------------------------------------------------------------------------------

    def _meta(self, fingerprint: str, key: str, rank: int, method: str | None = None) -> dict[str, str]:
        return {
            "format": _FORMAT,
            "fingerprint": str(fingerprint),
            "key": str(key),
            "rank": str(int(rank)),
            "method": self.method if method is None else method,
            "storage_dtype": _STORAGE_DTYPES[self.storage_dtype],
        }

    def path_for(self, fingerprint: str, key: str, rank: int, *, method: str | None = None) -> Path:
        """The file that holds (or would hold) this entry; ``method`` defaults to :attr:`method`."""
        tag = self.method if method is None else method
        ident = json.dumps([str(fingerprint), str(key), int(rank), tag, _STORAGE_DTYPES[self.storage_dtype]])
        return self.directory / (hashlib.sha256(ident.encode()).hexdigest()[:40] + _SUFFIX)

    # -- the protocol -----------------------------------------------------------------------

    def get_or_compute(
        self, fingerprint: str, key: str, rank: int, compute: Callable[[], Subspace], *, method: str | None = None
    ) -> Subspace:
        found = self.lookup(fingerprint, key, rank, method=method)
        if found is not None:
            return found
        sub = compute()
        self._store(
            self.path_for(fingerprint, key, rank, method=method), self._meta(fingerprint, key, rank, method), sub
        )
        return sub

    def lookup(self, fingerprint: str, key: str, rank: int, *, method: str | None = None) -> Subspace | None:
        """The stored entry (float32, CPU; a queued one from memory), else ``None``; never computes.

        A corrupt entry is deleted and reported as a miss, as in :meth:`get_or_compute`.
        """
        path = self.path_for(fingerprint, key, rank, method=method)
        with self._queue:
            queued = self._pending.get(path)
        found = (
            _subspace(queued[1]) if queued is not None else self._load(path, self._meta(fingerprint, key, rank, method))
        )
        with self._lock:
            if found is not None:
                self.stats.hits += 1
            else:
                self.stats.misses += 1
        return found

    def contains(self, fingerprint: str, key: str, rank: int, *, method: str | None = None) -> bool:
        """Whether the entry is queued or its file exists (not read or verified; counts nothing)."""
        path = self.path_for(fingerprint, key, rank, method=method)
        with self._queue:
            if path in self._pending:
                return True
        return path.is_file()

    def put(self, fingerprint: str, key: str, rank: int, sub: Subspace, *, method: str | None = None) -> None:
        """Store a precomputed subspace; the file is written by a background thread.

        The tensors are copied to the CPU in the storage dtype before this returns (``sub`` may
        be changed or freed afterwards). Blocks while more than ``_PENDING_BYTES`` are queued.
        """
        path = self.path_for(fingerprint, key, rank, method=method)
        entry = (self._meta(fingerprint, key, rank, method), self._storage_tensors(sub, copy=True))
        size = _tensor_bytes(entry[1])
        with self._queue:
            while self._pending and self._pending_bytes + size > _PENDING_BYTES:
                self._queue.wait()
            old = self._pending.pop(path, None)  # a newer value for a queued key replaces it
            if old is not None:
                self._pending_bytes -= _tensor_bytes(old[1])
            self._pending[path] = entry
            self._pending_bytes += size
            if self._writer is None:
                # Not a daemon: the interpreter waits for queued writes at exit. The thread ends
                # as soon as the queue is empty, so an idle cache holds no thread.
                self._writer = threading.Thread(target=self._drain, name="lorax-cache-writer")
                self._writer.start()

    def flush(self) -> None:
        """Wait until every entry given to :meth:`put` is written (or its write failed and was logged)."""
        with self._queue:
            while self._pending:
                self._queue.wait()

    def clear(self) -> None:
        """Delete every entry (and leftover temporary file) of this cache's directory.

        Only files this class writes are removed; other processes may keep using the
        directory, and their in-flight writes simply land after the clear.
        """
        for entry in self._scan_files():
            _unlink_quietly(entry)

    def total_bytes(self) -> int:
        """Summed size of the entry files on disk now (a directory scan)."""
        return sum(size for _, size, _ in self._entries())

    # -- reading ----------------------------------------------------------------------------

    def _load(self, path: Path, expected: dict[str, str]) -> Subspace | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("subspace cache: cannot read %s (%s); recomputing", path, exc)
            return None
        try:
            sub = self._decode(data, expected)
        except _CorruptEntryError as exc:
            log.warning("subspace cache: corrupt entry %s (%s); deleting and recomputing", path, exc)
            with self._lock:
                self.stats.corrupt += 1
            _unlink_quietly(path)
            return None
        try:
            os.utime(path)  # LRU recency = modification time
        except OSError:
            pass  # evicted by another process after we read it: the data we hold is still valid
        return sub

    def _decode(self, data: bytes, expected: dict[str, str]) -> Subspace:
        from safetensors import SafetensorError
        from safetensors.torch import load

        from .linalg import Subspace

        meta = _read_metadata(data)
        for field, value in expected.items():
            if meta.get(field) != value:
                raise _CorruptEntryError(f"metadata {field!r} is {meta.get(field)!r}, expected {value!r}")
        try:
            tensors = load(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise _CorruptEntryError(f"unreadable tensors: {exc}") from None
        if set(tensors) != {"U", "S", "V"}:
            raise _CorruptEntryError(f"tensors {sorted(tensors)}, expected U, S, V")
        U, S, V = tensors["U"], tensors["S"], tensors["V"]
        if U.dtype != self.storage_dtype or V.dtype != self.storage_dtype or S.dtype != torch.float32:
            raise _CorruptEntryError(f"dtypes U {U.dtype}, S {S.dtype}, V {V.dtype}")
        if U.ndim != 2 or V.ndim != 2 or S.ndim != 1 or not U.shape[1] == S.shape[0] == V.shape[1]:
            raise _CorruptEntryError(f"shapes U {tuple(U.shape)}, S {tuple(S.shape)}, V {tuple(V.shape)}")
        if meta.get("sha256") != _digest(meta, tensors):
            raise _CorruptEntryError("checksum mismatch")
        return Subspace(U=U.to(torch.float32), S=S, V=V.to(torch.float32))

    # -- writing ----------------------------------------------------------------------------

    def _storage_tensors(self, sub: Subspace, *, copy: bool = False) -> dict[str, torch.Tensor]:
        # copy=True for queued entries: .to() would otherwise return the caller's own tensor when
        # it is already a contiguous CPU tensor of that dtype, and the caller may change it.
        def convert(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return t.detach().to("cpu", dtype, copy=copy).contiguous()

        return {
            "U": convert(sub.U, self.storage_dtype),
            "S": convert(sub.S, torch.float32),
            "V": convert(sub.V, self.storage_dtype),
        }

    def _drain(self) -> None:
        """The writer thread: write queued entries in order; exit when none is left."""
        while True:
            with self._queue:
                if not self._pending:
                    self._writer = None
                    self._queue.notify_all()
                    return
                path, (meta, tensors) = next(iter(self._pending.items()))
            try:
                self._write(path, meta, tensors)
            except Exception as exc:  # a write failure must never leave flush() waiting forever
                log.warning("subspace cache: cannot write %s (%s); continuing without caching it", path, exc)
            with self._queue:
                if self._pending.get(path, (None, None))[1] is tensors:  # not replaced meanwhile
                    del self._pending[path]
                    self._pending_bytes -= _tensor_bytes(tensors)
                self._queue.notify_all()

    def _store(self, path: Path, meta: dict[str, str], sub: Subspace) -> None:
        self._write(path, meta, self._storage_tensors(sub))

    def _write(self, path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        meta = {**meta, "sha256": _digest(meta, tensors)}
        payload = save(tensors, metadata=meta)
        try:
            # The package's one atomic writer (temporary file in the same folder, then a rename):
            # readers see no file or a whole one. No fsync: a file cut short by a crash fails its
            # checksum and is recomputed.
            write_files([(path, payload)], overwrite=True, sync=False)
        except OutputError as exc:
            log.warning("subspace cache: cannot write %s (%s); continuing without caching it", path, exc)
            return
        with self._lock:
            self.stats.writes += 1
        # Rescan after every write (a few ms for thousands of entries, against the seconds an SVD
        # takes): another process's writes are then always counted, so once writers stop the
        # total is within the bound whatever the interleaving was.
        self._evict()

    def _scan_files(self) -> list[Path]:
        try:
            with os.scandir(self.directory) as it:
                return [
                    Path(e.path)
                    for e in it
                    if e.is_file() and (e.name.endswith(_SUFFIX) or e.name.endswith(_TMP_SUFFIX))
                ]
        except FileNotFoundError:
            return []

    def _entries(self) -> list[tuple[float, int, str]]:
        """(mtime, size, path) of every entry file; stale temporary files are removed on the way."""
        out: list[tuple[float, int, str]] = []
        now = time.time()
        try:
            with os.scandir(self.directory) as it:
                for e in it:
                    is_tmp = e.name.endswith(_TMP_SUFFIX)
                    if not (is_tmp or e.name.endswith(_SUFFIX)):
                        continue
                    try:
                        st = e.stat()
                    except FileNotFoundError:
                        continue  # removed by another process while we listed
                    if not is_tmp:
                        out.append((st.st_mtime, st.st_size, e.path))
                    elif now - st.st_mtime > _STALE_TMP_S:
                        _unlink_quietly(Path(e.path))
        except FileNotFoundError:
            pass
        return out

    def _evict(self) -> None:
        """Delete least-recently-used entries until the total is under the low-water mark."""
        entries = sorted(self._entries(), key=lambda e: e[0])
        total = sum(size for _, size, _ in entries)
        if total > self.max_bytes:
            goal = int(self.max_bytes * _LOW_WATER)
            for _, size, path in entries:
                if total <= goal:
                    break
                if _unlink_quietly(Path(path)):
                    with self._lock:
                        self.stats.evicted += 1
                total -= size


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _subspace(tensors: dict[str, torch.Tensor]) -> Subspace:
    """A stored entry's tensors as a float32 :class:`Subspace` (fresh copies, as a decoded file gives)."""
    from .linalg import Subspace

    return Subspace(
        U=tensors["U"].to(torch.float32, copy=True),
        S=tensors["S"].clone(),
        V=tensors["V"].to(torch.float32, copy=True),
    )


def _unlink_quietly(path: Path) -> bool:
    """Remove a file; ``False`` if it was already gone or could not be removed (e.g. open on Windows)."""
    try:
        path.unlink()
    except OSError:
        return False
    return True


def default_cache_dir() -> Path:
    """The command line's cache directory: ``$XDG_CACHE_HOME/lorax``, else ``~/.cache/lorax``.

    On Windows, without ``XDG_CACHE_HOME``, ``%LOCALAPPDATA%\\lorax\\cache``. Nothing is created.
    """
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "lorax"
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "lorax" / "cache"
    return Path.home() / ".cache" / "lorax"


def open_cache(
    directory: str | os.PathLike[str] | None = None,
    *,
    enabled: bool = True,
    max_bytes: int = DEFAULT_DISK_BYTES,
    memory_bytes: int = 0,
    storage_dtype: torch.dtype = torch.float16,
) -> SubspaceCache:
    """The cache a host should use: what ``--no-cache``, ``--cache-dir`` and the node option map to.

    Args:
        directory: cache root; ``None`` means :func:`default_cache_dir`.
        enabled: ``False`` returns a :class:`NullCache` (every subspace recomputed, nothing written).
        max_bytes: disk bound, see :class:`DiskCache`.
        memory_bytes: when positive, a :class:`MemoryCache` of this size sits in front of the
            disk cache (useful when one process runs several transfers on the same models).
        storage_dtype: see :class:`DiskCache`.

    Raises:
        CacheError: the directory is unusable (the message names it and ends with ``CacheError.FIX``).
    """
    if not enabled:
        return NullCache()
    disk = DiskCache(
        default_cache_dir() if directory is None else directory, max_bytes=max_bytes, storage_dtype=storage_dtype
    )
    return MemoryCache(memory_bytes, backing=disk) if memory_bytes > 0 else disk
