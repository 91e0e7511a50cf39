"""Subspace cache: hits, LRU eviction, corruption recovery, multi-process safety, fp16 accuracy, bypass."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from _cache_worker import hammer, subspace_for, weight_for

from lorax_core.cache import (
    DiskCache,
    MemoryCache,
    NullCache,
    SubspaceCache,
    default_cache_dir,
    open_cache,
)
from lorax_core.errors import CacheError, OptionError
from lorax_core.linalg import Subspace, top_subspace


class Counter:
    """A ``compute`` callback that counts its calls."""

    def __init__(self, key: str, rank: int = 16) -> None:
        self.key, self.rank, self.calls = key, rank, 0

    def __call__(self) -> Subspace:
        self.calls += 1
        return subspace_for(self.key, self.rank)


def entry_files(cache: DiskCache) -> list[Path]:
    return sorted(cache.directory.glob("*.safetensors"))


def assert_close_fp16(got: Subspace, want: Subspace) -> None:
    # float16 storage rounds each entry of U/V by at most 2^-11 relative (|entries| ≤ 1); S is float32.
    assert got.U.dtype == got.V.dtype == got.S.dtype == torch.float32
    assert torch.allclose(got.U, want.U, atol=1e-3, rtol=0)
    assert torch.allclose(got.V, want.V, atol=1e-3, rtol=0)
    assert torch.equal(got.S, want.S.cpu())


# -- protocol and bypass ---------------------------------------------------------------------


def test_every_cache_satisfies_the_protocol(tmp_path: Path) -> None:
    for cache in (NullCache(), MemoryCache(), DiskCache(tmp_path)):
        assert isinstance(cache, SubspaceCache)


def test_null_cache_always_computes() -> None:
    cache, compute = NullCache(), Counter("a")
    first = cache.get_or_compute("fp", "a", 16, compute)
    second = cache.get_or_compute("fp", "a", 16, compute)
    assert compute.calls == 2
    assert torch.equal(first.U, second.U)


def test_open_cache_disabled_is_a_null_cache_and_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "never"
    cache = open_cache(target, enabled=False)
    assert isinstance(cache, NullCache)
    cache.get_or_compute("fp", "a", 16, Counter("a"))
    assert not target.exists()


def test_open_cache_layers_memory_over_disk(tmp_path: Path) -> None:
    cache = open_cache(tmp_path, memory_bytes=1 << 20)
    assert isinstance(cache, MemoryCache)
    assert isinstance(cache.backing, DiskCache)
    compute = Counter("a")
    cache.get_or_compute("fp", "a", 16, compute)
    cache.get_or_compute("fp", "a", 16, compute)
    assert compute.calls == 1
    assert cache.stats.hits == 1
    assert len(entry_files(cache.backing)) == 1


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "lorax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr("sys.platform", "linux")
    assert default_cache_dir() == Path.home() / ".cache" / "lorax"


# -- memory cache ----------------------------------------------------------------------------


def test_memory_cache_hits_and_evicts_least_recently_used() -> None:
    one = subspace_for("a")
    size = sum(t.numel() * t.element_size() for t in (one.U, one.S, one.V))
    cache = MemoryCache(max_bytes=2 * size)
    calls = {k: Counter(k) for k in "abc"}
    cache.get_or_compute("fp", "a", 16, calls["a"])
    cache.get_or_compute("fp", "b", 16, calls["b"])
    cache.get_or_compute("fp", "a", 16, calls["a"])  # a is now more recent than b
    cache.get_or_compute("fp", "c", 16, calls["c"])  # evicts b
    assert len(cache) == 2 and cache.nbytes <= 2 * size
    cache.get_or_compute("fp", "a", 16, calls["a"])
    cache.get_or_compute("fp", "b", 16, calls["b"])
    assert (calls["a"].calls, calls["b"].calls, calls["c"].calls) == (1, 2, 1)
    assert cache.stats.evicted >= 1


def test_memory_cache_keys_include_fingerprint_and_rank() -> None:
    cache = MemoryCache()
    compute = Counter("a")
    cache.get_or_compute("fp1", "a", 16, compute)
    cache.get_or_compute("fp2", "a", 16, compute)
    cache.get_or_compute("fp1", "a", 8, compute)
    assert compute.calls == 3


def test_memory_cache_rejects_negative_size() -> None:
    with pytest.raises(OptionError, match=re.escape("MemoryCache max_bytes must be a non-negative integer; got -1.")):
        MemoryCache(max_bytes=-1)


# -- disk cache: basics ----------------------------------------------------------------------


def test_disk_cache_persists_across_instances(tmp_path: Path) -> None:
    compute = Counter("a")
    first = DiskCache(tmp_path).get_or_compute("fp", "a", 16, compute)
    fresh = DiskCache(tmp_path)
    second = fresh.get_or_compute("fp", "a", 16, compute)
    assert compute.calls == 1
    assert fresh.stats.hits == 1
    assert second.U.device.type == "cpu"
    assert_close_fp16(second, first)


def test_disk_cache_fp32_storage_is_exact(tmp_path: Path) -> None:
    compute = Counter("a")
    want = DiskCache(tmp_path, storage_dtype=torch.float32).get_or_compute("fp", "a", 16, compute)
    got = DiskCache(tmp_path, storage_dtype=torch.float32).get_or_compute("fp", "a", 16, compute)
    assert compute.calls == 1
    assert torch.equal(got.U, want.U) and torch.equal(got.S, want.S) and torch.equal(got.V, want.V)


def test_disk_cache_keys_separate_fingerprint_layer_rank_and_method(tmp_path: Path) -> None:
    compute = Counter("a")
    DiskCache(tmp_path).get_or_compute("fp1", "a", 16, compute)
    DiskCache(tmp_path).get_or_compute("fp2", "a", 16, compute)
    DiskCache(tmp_path).get_or_compute("fp1", "b", 16, compute)
    DiskCache(tmp_path).get_or_compute("fp1", "a", 8, compute)
    DiskCache(tmp_path, method="other-svd-v2").get_or_compute("fp1", "a", 16, compute)
    assert compute.calls == 5
    assert len(entry_files(DiskCache(tmp_path))) == 5


def test_disk_cache_clear_removes_entries(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    for key in "abc":
        cache.get_or_compute("fp", key, 16, Counter(key))
    (tmp_path / "unrelated.txt").write_text("keep me")
    cache.clear()
    assert entry_files(cache) == []
    assert cache.total_bytes() == 0
    assert (tmp_path / "unrelated.txt").read_text() == "keep me"
    compute = Counter("a")
    cache.get_or_compute("fp", "a", 16, compute)
    assert compute.calls == 1


def test_disk_cache_evicts_least_recently_used(tmp_path: Path) -> None:
    probe = DiskCache(tmp_path / "probe")
    probe.get_or_compute("fp", "x", 16, Counter("x"))
    size = probe.total_bytes()
    cache = DiskCache(tmp_path / "c", max_bytes=int(3.5 * size))
    for i, key in enumerate("abc"):
        cache.get_or_compute("fp", key, 16, Counter(key))
        os.utime(cache.path_for("fp", key, 16), (1000.0 + i, 1000.0 + i))  # a oldest, c newest
    cache.get_or_compute("fp", "a", 16, Counter("a"))  # a hit refreshes a: b is now the oldest
    assert cache.stats.hits == 1
    cache.get_or_compute("fp", "d", 16, Counter("d"))  # 4 entries > 3.5: evict down to 90 %
    assert cache.total_bytes() <= cache.max_bytes
    assert not cache.path_for("fp", "b", 16).exists()
    for key in "acd":
        assert cache.path_for("fp", key, 16).exists(), key
    assert cache.stats.evicted == 1


def test_disk_cache_bound_holds_over_many_writes(tmp_path: Path) -> None:
    probe = DiskCache(tmp_path / "probe")
    probe.get_or_compute("fp", "x", 16, Counter("x"))
    size = probe.total_bytes()
    cache = DiskCache(tmp_path / "c", max_bytes=5 * size)
    for i in range(20):
        cache.get_or_compute("fp", f"k{i}", 16, Counter(f"k{i}"))
        assert cache.total_bytes() <= cache.max_bytes
    assert cache.path_for("fp", "k19", 16).exists()


def test_disk_cache_removes_stale_temporary_files(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=1)
    stale = cache.directory / ".crashed.tmp"
    stale.write_bytes(b"partial")
    os.utime(stale, (0.0, 0.0))
    fresh = cache.directory / ".inflight.tmp"
    fresh.write_bytes(b"partial")
    cache.get_or_compute("fp", "a", 16, Counter("a"))  # over the bound: triggers a scan
    assert not stale.exists()
    assert fresh.exists()  # may belong to a writer in another process


# -- disk cache: corruption ------------------------------------------------------------------


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _header_end(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


CORRUPTIONS = {
    "flip_last_data_byte": lambda p: _flip(p, p.stat().st_size - 1),
    "flip_first_data_byte": lambda p: _flip(p, _header_end(p)),
    "flip_header_byte": lambda p: _flip(p, 40),
    "flip_length_prefix": lambda p: _flip(p, 0),
    "truncate_half": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "truncate_to_header": lambda p: p.write_bytes(p.read_bytes()[: _header_end(p)]),
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(os.urandom(300)),
    "dtype_letter": lambda p: p.write_bytes(p.read_bytes().replace(b'"F16"', b'"I16"', 1)),
}


@pytest.mark.parametrize("damage", sorted(CORRUPTIONS))
def test_corrupt_entry_is_deleted_and_recomputed(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    cache = DiskCache(tmp_path)
    compute = Counter("a")
    want = cache.get_or_compute("fp", "a", 16, compute)
    path = cache.path_for("fp", "a", 16)
    CORRUPTIONS[damage](path)
    with caplog.at_level(logging.WARNING, logger="lorax_core.cache"):
        got = cache.get_or_compute("fp", "a", 16, compute)
    assert compute.calls == 2
    assert cache.stats.corrupt == 1
    assert "corrupt entry" in caplog.text
    assert torch.equal(got.U, want.U)  # the recomputed value, not the damaged one
    # The entry was rewritten and is valid again.
    again = DiskCache(tmp_path)
    again.get_or_compute("fp", "a", 16, compute)
    assert compute.calls == 2 and again.stats.hits == 1


def test_entry_for_another_key_is_not_trusted(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    cache.get_or_compute("fp", "a", 16, Counter("a"))
    shutil.copy(cache.path_for("fp", "a", 16), cache.path_for("fp", "b", 16))
    compute = Counter("b")
    got = cache.get_or_compute("fp", "b", 16, compute)
    assert compute.calls == 1 and cache.stats.corrupt == 1
    assert torch.equal(got.U, subspace_for("b").U)


# -- disk cache: failures --------------------------------------------------------------------


def test_unusable_directory_raises_cache_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CacheError, match=r"subspace cache directory '.*file' cannot be created .*turn the subspace cache off\."):
        DiskCache(blocker)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_bytes": 0}, "DiskCache max_bytes must be a positive integer; got 0."),
        (
            {"storage_dtype": torch.bfloat16},
            "DiskCache storage_dtype must be torch.float16 or torch.float32; got torch.bfloat16.",
        ),
    ],
)
def test_bad_disk_cache_options_raise(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(OptionError, match=re.escape(message)):
        DiskCache(tmp_path, **kwargs)  # type: ignore[arg-type]


def test_write_failure_is_logged_and_the_value_still_returned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = DiskCache(tmp_path / "c")
    shutil.rmtree(cache.directory)  # e.g. removed by a user while a transfer runs
    compute = Counter("a")
    with caplog.at_level(logging.WARNING, logger="lorax_core.cache"):
        got = cache.get_or_compute("fp", "a", 16, compute)
    assert compute.calls == 1
    assert torch.equal(got.U, subspace_for("a").U)
    assert "cannot write" in caplog.text


# -- disk cache: several processes at once ----------------------------------------------------


@pytest.mark.parametrize("max_entries", [100, 3], ids=["roomy", "evicting"])
def test_two_processes_writing_at_once(tmp_path: Path, max_entries: int) -> None:
    probe = DiskCache(tmp_path / "probe")
    probe.get_or_compute("fp", "x", 16, Counter("x"))
    max_bytes = max_entries * probe.total_bytes()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    shared = [f"shared{i}" for i in range(6)]
    jobs = [
        ctx.Process(target=hammer, args=(str(tmp_path / "c"), [*shared, f"own{w}a", f"own{w}b"], 3, max_bytes, barrier))
        for w in range(2)
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=240)
    assert [job.exitcode for job in jobs] == [0, 0]
    cache = DiskCache(tmp_path / "c", max_bytes=max_bytes)
    assert list(cache.directory.glob("*.tmp")) == []
    assert cache.total_bytes() <= max_bytes
    # Every surviving entry is valid and holds the right subspace.
    for key in [*shared, "own0a", "own0b", "own1a", "own1b"]:
        if cache.path_for("fp", key, 16).exists():
            compute = Counter(key)
            assert_close_fp16(cache.get_or_compute("fp", key, 16, compute), subspace_for(key))
            assert compute.calls == 0
    assert cache.stats.corrupt == 0


# -- storage accuracy -------------------------------------------------------------------------


def _decaying(m: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(m, n, generator=gen))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    s = torch.arange(1, n + 1, dtype=torch.float32) ** -0.7
    return q1 @ torch.diag(s) @ q2.T


def test_fp16_storage_error_is_within_the_documented_bound(tmp_path: Path) -> None:
    """fp16 entries move the projector and a projected ΔW by < 1e-3 relative (measured ≈ 3–4e-4)."""
    W = _decaying(256, 192, seed=1)
    W_t = W + 0.05 * float(W.abs().mean()) * torch.randn(256, 192, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(256, 8, generator=gen) @ torch.randn(8, 192, generator=gen)
    cache = DiskCache(tmp_path)
    for name, weight in (("source", W), ("target", W_t)):
        exact = top_subspace(weight, 64)
        cache.get_or_compute("fp", name, 64, lambda exact=exact: exact)
        stored = DiskCache(tmp_path).get_or_compute("fp", name, 64, lambda: pytest.fail("should be a hit"))
        proj, proj16 = exact.U @ exact.U.T, stored.U @ stored.U.T
        assert float((proj16 - proj).norm() / proj.norm()) < 1e-3
        moved = exact.U @ (exact.U.T @ delta @ exact.V) @ exact.V.T
        moved16 = stored.U @ (stored.U.T @ delta @ stored.V) @ stored.V.T
        assert float((moved16 - moved).norm() / moved.norm()) < 1e-3
        assert torch.equal(stored.S, exact.S)


def test_hit_returns_float32_on_cpu_even_for_half_weights(tmp_path: Path) -> None:
    weight = weight_for("a").to(torch.float16)
    cache = DiskCache(tmp_path)
    cache.get_or_compute("fp", "a", 16, lambda: top_subspace(weight, 16))
    got = DiskCache(tmp_path).get_or_compute("fp", "a", 16, lambda: pytest.fail("should be a hit"))
    assert got.U.dtype == torch.float32 and got.U.device.type == "cpu"
    assert got.U.shape == (96, 16) and got.V.shape == (64, 16) and got.S.shape == (16,)
