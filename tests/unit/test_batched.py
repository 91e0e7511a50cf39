"""Batched float32 subspaces (lorax_core.batched), the provider's prefetch, and cache lookup/put/flush.

Everything runs on the CPU (``device="cpu"``); tests/perf/test_perf_gpu.py repeats the
accuracy checks on CUDA.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
import torch

from lorax_core.batched import (
    BATCHED_VERSION,
    BatchStats,
    batch_capacity,
    read_ahead,
    top_subspaces_batched,
)
from lorax_core.cache import DiskCache, MemoryCache, NullCache, WritableSubspaceCache
from lorax_core.errors import NonFiniteError, OptionError, RankError, ShapeMismatchError
from lorax_core.linalg import SUBSPACE_VERSION, Subspace, top_subspace
from lorax_core.subspaces import SubspaceProvider
from lorax_core.types import DictWeights

ROOT = Path(__file__).resolve().parents[2]


def power_law(m: int, n: int, seed: int = 0, alpha: float = 0.7) -> torch.Tensor:
    """``(m, n)`` float32 weight with singular values ``i^-alpha`` (a trained layer's slow decay)."""
    gen = torch.Generator().manual_seed(seed)
    d = min(m, n)
    p, _ = torch.linalg.qr(torch.randn(m, d, generator=gen, dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=torch.float64))
    s = torch.arange(1, d + 1, dtype=torch.float64) ** -alpha
    return ((p * s) @ q.T).to(torch.float32)


def reference(w: torch.Tensor, R: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 SVD of the weight as stored (after any half-precision rounding)."""
    U, S, Vh = torch.linalg.svd(w.reshape(w.shape[0], -1).double(), full_matrices=False)
    return U[:, :R], S[:R], Vh[:R].T


def projector_error(A: torch.Tensor, B: torch.Tensor) -> float:
    """``‖AAᵀ − BBᵀ‖_F / √R``: basis- and sign-independent subspace distance."""
    A, B = A.double(), B.double()
    # ‖AAᵀ − BBᵀ‖²_F = ‖AᵀA‖² + ‖BᵀB‖² − 2‖AᵀB‖²: R×R products instead of d×d ones.
    sq = (A.T @ A).square().sum() + (B.T @ B).square().sum() - 2 * (A.T @ B).square().sum()
    return float(sq.clamp_min(0.0).sqrt() / A.shape[1] ** 0.5)


def orthonormality_error(Q: torch.Tensor) -> float:
    return float((Q.T.double() @ Q.double() - torch.eye(Q.shape[1], dtype=torch.float64)).abs().max())


def ok(result: Subspace | NonFiniteError) -> Subspace:
    assert isinstance(result, Subspace), result
    return result


class CountingWeights(DictWeights):
    """A weight source that counts reads (a recomputation reads the weight again)."""

    def __init__(self, weights: dict[str, torch.Tensor], fingerprint: str = "model") -> None:
        super().__init__(weights, fingerprint=fingerprint)
        self.reads: dict[str, int] = {}
        self._count_lock = threading.Lock()  # prefetch reads in a background thread

    def get(self, key: str) -> torch.Tensor:
        with self._count_lock:
            self.reads[key] = self.reads.get(key, 0) + 1
        return super().get(key)

    @property
    def total_reads(self) -> int:
        return sum(self.reads.values())


# -- accuracy ---------------------------------------------------------------------------------

CASES = [
    pytest.param((320, 320), 80, torch.float32, id="320x320-R80"),
    pytest.param((320, 320), 320, torch.float32, id="320x320-R320-complete"),
    pytest.param((640, 2048), 160, torch.float32, id="640x2048-wide-R160"),
    pytest.param((2048, 640), 320, torch.float32, id="2048x640-tall-R320"),
    pytest.param((320, 320, 3, 3), 80, torch.float32, id="conv-320x320x3x3-R80"),
    pytest.param((640, 2048), 320, torch.float16, id="640x2048-fp16-R320"),
]


@pytest.mark.parametrize(("shape", "R", "dtype"), CASES)
def test_matches_float64_svd_and_top_subspace(shape: tuple[int, ...], R: int, dtype: torch.dtype) -> None:
    m, n = shape[0], int(torch.tensor(shape[1:]).prod())
    weights = [power_law(m, n, seed=s).reshape(shape).to(dtype) for s in range(2)]
    stats = BatchStats()
    results = top_subspaces_batched(weights, R, device="cpu", stats=stats)
    assert stats.layers == 2 and stats.batches == 1 and stats.fallbacks == 0
    for w, result in zip(weights, results, strict=True):
        sub = ok(result)
        assert sub.U.dtype == sub.S.dtype == sub.V.dtype == torch.float32
        assert sub.U.shape == (m, R) and sub.S.shape == (R,) and sub.V.shape == (n, R)
        assert sub.U.is_contiguous() and sub.S.is_contiguous() and sub.V.is_contiguous()
        U0, S0, V0 = reference(w, R)
        assert projector_error(sub.U, U0) <= 1e-3 and projector_error(sub.V, V0) <= 1e-3
        assert float(((sub.S.double() - S0).abs() / S0).max()) <= 1e-4
        assert orthonormality_error(sub.U) <= 1e-5 and orthonormality_error(sub.V) <= 1e-5
        # Same numbers as the float64-backed path, up to float32 rounding, in the same signs.
        want = top_subspace(w, R)
        assert torch.allclose(sub.S, want.S, rtol=1e-4, atol=0)
        assert projector_error(sub.U, want.U) <= 1e-3
        # The leading vectors (large spectral gaps) agree entry by entry: same sign convention.
        assert torch.allclose(sub.U[:, :16], want.U[:, :16], atol=1e-4)
        assert torch.allclose(sub.V[:, :16], want.V[:, :16], atol=1e-4)
        idx = sub.U.abs().argmax(dim=0)
        assert bool((sub.U.gather(0, idx[None]) > 0).all())


def test_rank_is_clipped_like_top_subspace() -> None:
    w = power_law(48, 96)
    sub = ok(top_subspaces_batched([w], 500, device="cpu")[0])
    assert sub.rank == 48 and sub.U.shape == (48, 48) and sub.V.shape == (96, 48)


@pytest.mark.parametrize("rank", [0, -3])
def test_rank_below_one_raises(rank: int) -> None:
    with pytest.raises(RankError, match="positive integer"):
        top_subspaces_batched([power_law(32, 32)], rank, device="cpu")


def test_mixed_shapes_raise() -> None:
    with pytest.raises(ShapeMismatchError, match="one flattened shape"):
        top_subspaces_batched([power_law(32, 32), power_law(32, 48)], 8, device="cpu")


def test_conv_and_linear_of_the_same_flattened_shape_batch_together() -> None:
    conv, lin = power_law(32, 72, seed=1).reshape(32, 8, 3, 3), power_law(32, 72, seed=2)
    stats = BatchStats()
    got = top_subspaces_batched([conv, lin], 16, device="cpu", stats=stats)
    assert stats.batches == 1
    assert projector_error(ok(got[0]).V, top_subspace(conv, 16).V) <= 1e-4


def test_empty_input_gives_an_empty_list() -> None:
    assert top_subspaces_batched([], 8, device="cpu") == []


# -- fallback, non-finite layers, chunking -------------------------------------------------------


def test_rank_deficient_and_zero_layers_fall_back_and_stay_orthonormal() -> None:
    gen = torch.Generator().manual_seed(3)
    deficient = torch.randn(96, 10, generator=gen) @ torch.randn(10, 128, generator=gen)  # rank 10 < R
    zero = torch.zeros(96, 128)
    good = power_law(96, 128)
    stats = BatchStats()
    results = [ok(r) for r in top_subspaces_batched([good, deficient, zero, good], 24, device="cpu", stats=stats)]
    assert stats.fallbacks == 2  # exactly the two degenerate layers
    for w, sub in zip((deficient, zero), results[1:3], strict=True):
        want = top_subspace(w, 24)  # the fallback is the reference path itself
        assert torch.equal(sub.U, want.U) and torch.equal(sub.S, want.S) and torch.equal(sub.V, want.V)
        assert orthonormality_error(sub.U) <= 1e-5 and orthonormality_error(sub.V) <= 1e-5
    assert torch.equal(results[0].U, results[3].U)


def test_failed_check_falls_back_per_layer() -> None:
    weights = [power_law(64, 96, seed=s) for s in range(3)]
    stats = BatchStats()
    # No float32 computation meets 1e-12: every layer must come from top_subspace.
    results = top_subspaces_batched(weights, 16, device="cpu", tol=1e-12, stats=stats)
    assert stats.fallbacks == 3
    for w, result in zip(weights, results, strict=True):
        assert torch.equal(ok(result).U, top_subspace(w, 16).U)


def test_non_finite_layer_fails_alone() -> None:
    weights = [power_law(64, 96, seed=s) for s in range(4)]
    bad_nan, bad_inf = weights[1].clone(), weights[2].clone()
    bad_nan[3, 5] = float("nan")
    bad_inf[0, 0] = float("inf")
    mixed = [weights[0], bad_nan, bad_inf, weights[3]]
    results = top_subspaces_batched(mixed, 16, device="cpu")
    assert isinstance(results[1], NonFiniteError) and isinstance(results[2], NonFiniteError)
    with pytest.raises(NonFiniteError) as want:
        top_subspace(bad_nan, 16)
    assert str(results[1]) == str(want.value)  # the reference path's own message
    clean = top_subspaces_batched([weights[0], weights[3]], 16, device="cpu")
    for got, expected in zip((results[0], results[3]), clean, strict=True):
        assert torch.allclose(ok(got).U, ok(expected).U, atol=1e-6)


def test_small_batch_budget_chunks_without_changing_results() -> None:
    weights = [power_law(64, 96, seed=s) for s in range(5)]
    one, many = BatchStats(), BatchStats()
    together = top_subspaces_batched(weights, 16, device="cpu", stats=one)
    apart = top_subspaces_batched(weights, 16, device="cpu", max_batch_bytes=1, stats=many)
    assert one.batches == 1 and many.batches == 5 and many.layers == 5
    for a, b in zip(together, apart, strict=True):
        assert torch.allclose(ok(a).U, ok(b).U, atol=1e-6) and torch.allclose(ok(a).S, ok(b).S, rtol=1e-6)


def test_batch_capacity_respects_the_budget() -> None:
    one = batch_capacity((1280, 5120), 320, 1)
    assert one == 1  # a layer larger than the budget still runs, alone
    default = batch_capacity((1280, 5120), 320)
    assert 1 <= default < batch_capacity((320, 320), 320)
    assert batch_capacity((1280, 1280), 320, 2 * 512 * 1024**2) >= 2 * batch_capacity((1280, 1280), 320, 512 * 1024**2)


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"tol": 0.0}, "tolerance"), ({"max_batch_bytes": 0}, "max_batch_bytes")]
)
def test_bad_options_raise(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(OptionError, match=message):
        top_subspaces_batched([power_law(16, 16)], 4, device="cpu", **kwargs)  # type: ignore[arg-type]


def test_version_differs_from_the_reference_algorithm() -> None:
    assert BATCHED_VERSION != SUBSPACE_VERSION


# -- read_ahead ----------------------------------------------------------------------------------


def test_read_ahead_keeps_order_and_reads_in_another_thread() -> None:
    threads: list[str] = []

    def read(job: int) -> int:
        threads.append(threading.current_thread().name)
        return job * 10

    assert list(read_ahead(range(5), read)) == [0, 10, 20, 30, 40]
    assert set(threads) == {"lorax-read-ahead"}


def test_read_ahead_stops_reading_when_closed_early() -> None:
    reads: list[int] = []
    with closing(read_ahead(range(100), lambda job: reads.append(job) or job)) as it:
        assert next(it) == 0
    # One in use, one queued, one being read, at most one more started before the stop was seen.
    assert len(reads) <= 4


def test_read_ahead_raises_the_readers_error_after_earlier_results() -> None:
    def read(job: int) -> int:
        if job == 2:
            raise ValueError("unreadable")
        return job

    got: list[int] = []
    with pytest.raises(ValueError, match="unreadable"):
        for item in read_ahead(range(5), read):
            got.append(item)
    assert got == [0, 1]


# -- the provider ------------------------------------------------------------------------------


def provider_model(seed: int = 0) -> dict[str, torch.Tensor]:
    return {
        "a.weight": power_law(64, 96, seed=seed),
        "b.weight": power_law(64, 96, seed=seed + 1),
        "c.weight": power_law(96, 48, seed=seed + 2),
        "conv.weight": power_law(32, 72, seed=seed + 3).reshape(32, 8, 3, 3),
    }


REQUESTS = [("a.weight", 16), ("b.weight", 16), ("c.weight", 16), ("conv.weight", 8), ("a.weight", 16)]


@pytest.mark.parametrize("cache_kind", ["none", "null", "memory", "disk"])
def test_prefetch_then_get_reads_each_weight_once(cache_kind: str, tmp_path: Path) -> None:
    cache = {"none": None, "null": NullCache(), "memory": MemoryCache(), "disk": DiskCache(tmp_path)}[cache_kind]
    model = provider_model()
    weights = CountingWeights(model)
    provider = SubspaceProvider(cache, "cpu", batched=True)
    provider.prefetch(weights, REQUESTS)
    assert weights.reads == {"a.weight": 1, "b.weight": 1, "c.weight": 1, "conv.weight": 1}
    assert provider.batch_stats.layers == 4 and provider.batch_stats.batches == 3  # one batch per (shape, rank)
    want = top_subspaces_batched([model["a.weight"], model["b.weight"]], 16, device="cpu")
    for key, rank in REQUESTS:
        sub = provider.get(weights, key, rank)
        assert sub.rank == rank
    assert weights.total_reads == 4  # every get was served without reading (or decomposing) again
    got = provider.get(weights, "b.weight", 16)
    # Prefetched subspaces are served exactly as computed, whatever the cache stores.
    assert torch.equal(got.U, ok(want[1]).U) and torch.equal(got.S, ok(want[1]).S)
    provider.flush()
    provider.release()
    again = provider.get(weights, "b.weight", 16)
    if cache_kind in ("memory", "disk"):  # released here, served by the cache (float16 U/V on disk)
        assert weights.total_reads == 4
        assert torch.allclose(again.U, got.U, atol=1e-3 if cache_kind == "disk" else 0.0)
    else:  # nothing kept it: decomposed again
        assert weights.total_reads == 5


def test_prefetch_skips_what_the_disk_cache_holds(tmp_path: Path) -> None:
    model = provider_model()
    first = SubspaceProvider(DiskCache(tmp_path), "cpu", batched=True)
    first.prefetch(CountingWeights(model), REQUESTS)
    first.flush()
    assert len(list(DiskCache(tmp_path).directory.glob("*.safetensors"))) == 4
    weights = CountingWeights(model)
    again = SubspaceProvider(DiskCache(tmp_path), "cpu", batched=True)
    again.prefetch(weights, REQUESTS)
    for key, rank in REQUESTS:
        again.get(weights, key, rank)
    assert weights.total_reads == 0 and again.batch_stats.layers == 0


def test_batched_and_reference_entries_are_never_shared(tmp_path: Path) -> None:
    model = provider_model()
    batched_weights, cpu_weights = CountingWeights(model), CountingWeights(model)
    batched = SubspaceProvider(DiskCache(tmp_path), "cpu", batched=True)
    batched.prefetch(batched_weights, [("a.weight", 16)])
    batched.flush()
    # The one-layer path misses the batched entry, computes with top_subspace and writes its own.
    cpu = SubspaceProvider(DiskCache(tmp_path), "cpu", batched=False).get(cpu_weights, "a.weight", 16)
    assert cpu_weights.reads == {"a.weight": 1}
    assert torch.equal(cpu.U, top_subspace(model["a.weight"], 16).U)
    assert len(list(DiskCache(tmp_path).directory.glob("*.safetensors"))) == 2
    # ... and a batched provider never reads the top_subspace entry of a layer it did not prefetch.
    DiskCache(tmp_path).get_or_compute("model", "b.weight", 16, lambda: top_subspace(model["b.weight"], 16))
    fresh = CountingWeights(model)
    SubspaceProvider(DiskCache(tmp_path), "cpu", batched=True).get(fresh, "b.weight", 16)
    assert fresh.reads == {"b.weight": 1}


def test_memory_cache_keeps_methods_apart() -> None:
    cache, model = MemoryCache(), provider_model()
    weights = CountingWeights(model)
    SubspaceProvider(cache, "cpu", batched=True).prefetch(weights, [("a.weight", 16)])
    SubspaceProvider(cache, "cpu", batched=False).get(weights, "a.weight", 16)
    assert weights.reads == {"a.weight": 2} and len(cache) == 2


def test_non_finite_weight_raises_from_get_for_that_key_only() -> None:
    model = provider_model()
    model["b.weight"] = model["b.weight"].clone()
    model["b.weight"][0, 0] = float("nan")
    weights = CountingWeights(model)
    provider = SubspaceProvider(None, "cpu", batched=True)
    provider.prefetch(weights, REQUESTS)
    for _ in range(2):  # remembered: the same error each time, without reading the weight again
        with pytest.raises(NonFiniteError, match="NaN or Inf"):
            provider.get(weights, "b.weight", 16)
    assert provider.get(weights, "a.weight", 16).rank == 16
    assert weights.reads["b.weight"] == 1


def test_source_that_raises_non_finite_on_reading_is_remembered() -> None:
    class CheckingWeights(CountingWeights):
        def get(self, key: str) -> torch.Tensor:
            if key == "c.weight":
                raise NonFiniteError("tensor 'c.weight' holds NaN")
            return super().get(key)

    weights = CheckingWeights(provider_model())
    provider = SubspaceProvider(None, "cpu", batched=True)
    provider.prefetch(weights, REQUESTS)
    with pytest.raises(NonFiniteError, match=r"c\.weight"):
        provider.get(weights, "c.weight", 16)
    assert provider.get(weights, "a.weight", 16).rank == 16


def test_unknown_and_unusual_keys_are_left_for_get() -> None:
    model = {**provider_model(), "bias": torch.ones(64)}
    weights = CountingWeights(model)
    provider = SubspaceProvider(None, "cpu", batched=True)
    provider.prefetch(weights, [("a.weight", 16), ("missing.weight", 16), ("bias", 4)])
    assert weights.reads == {"a.weight": 1}
    with pytest.raises(KeyError):
        provider.get(weights, "missing.weight", 16)


def test_get_without_prefetch_uses_the_batched_algorithm_once() -> None:
    model = provider_model()
    weights = CountingWeights(model)
    provider = SubspaceProvider(None, "cpu", batched=True)
    first = provider.get(weights, "c.weight", 16)
    assert provider.get(weights, "c.weight", 16) is first
    assert weights.reads == {"c.weight": 1} and provider.batch_stats.layers == 1
    assert torch.equal(first.U, ok(top_subspaces_batched([model["c.weight"]], 16, device="cpu")[0]).U)


def test_not_batched_prefetch_does_nothing_and_cpu_default_is_unchanged() -> None:
    model = provider_model()
    weights = CountingWeights(model)
    provider = SubspaceProvider(None, "cpu")  # batched=None on the CPU: the one-layer path
    assert provider.batched is False
    provider.prefetch(weights, REQUESTS)
    assert weights.total_reads == 0
    assert torch.equal(provider.get(weights, "a.weight", 16).U, top_subspace(model["a.weight"], 16).U)


def test_bad_rank_in_prefetch_raises() -> None:
    with pytest.raises(RankError):
        SubspaceProvider(None, "cpu", batched=True).prefetch(CountingWeights(provider_model()), [("a.weight", 0)])


def test_cache_without_put_cannot_be_batched() -> None:
    class OldCache:
        def get_or_compute(self, fingerprint: str, key: str, rank: int, compute: Callable[[], Subspace]) -> Subspace:
            return compute()

    with pytest.raises(OptionError, match="lookup/contains/put/flush"):
        SubspaceProvider(OldCache(), "cpu", batched=True)
    assert SubspaceProvider(OldCache(), "cuda").batched is False
    assert SubspaceProvider(None, "cuda").batched is True  # no CUDA needed to decide
    assert SubspaceProvider(NullCache(), "cuda:0").batched is True


# -- cache lookup / contains / put / flush -----------------------------------------------------------


def small_subspace(seed: int = 0) -> Subspace:
    return top_subspace(power_law(40, 24, seed=seed), 8)


def test_null_cache_lookup_put_flush() -> None:
    cache = NullCache()
    assert isinstance(cache, WritableSubspaceCache)
    cache.put("fp", "k", 8, small_subspace())
    cache.flush()
    assert cache.lookup("fp", "k", 8) is None and not cache.contains("fp", "k", 8)
    assert cache.stats.misses == 1


def test_memory_cache_lookup_put_and_methods() -> None:
    cache, sub = MemoryCache(), small_subspace()
    assert isinstance(cache, WritableSubspaceCache)
    assert cache.lookup("fp", "k", 8) is None
    cache.put("fp", "k", 8, sub, method="batched")
    assert cache.lookup("fp", "k", 8, method="batched") is sub and cache.contains("fp", "k", 8, method="batched")
    assert cache.lookup("fp", "k", 8) is None and not cache.contains("fp", "k", 8)  # another algorithm's key
    calls: list[int] = []
    got = cache.get_or_compute("fp", "k", 8, lambda: calls.append(1) or small_subspace(1), method="batched")
    assert got is sub and calls == []
    cache.flush()  # nothing pending: returns at once


def test_memory_cache_forwards_to_a_disk_backing(tmp_path: Path) -> None:
    disk = DiskCache(tmp_path)
    cache, sub = MemoryCache(backing=disk), small_subspace()
    cache.put("fp", "k", 8, sub, method="batched")
    cache.flush()
    assert disk.path_for("fp", "k", 8, method="batched").is_file()
    fresh = MemoryCache(backing=DiskCache(tmp_path))
    assert fresh.contains("fp", "k", 8, method="batched") and not fresh.contains("fp", "k", 8)
    found = fresh.lookup("fp", "k", 8, method="batched")
    assert found is not None and torch.allclose(found.U, sub.U, atol=1e-3)
    assert len(fresh) == 1  # kept in memory after the disk hit


@pytest.mark.parametrize("storage", [torch.float16, torch.float32])
def test_disk_cache_put_reads_back_the_same_before_and_after_the_write(tmp_path: Path, storage: torch.dtype) -> None:
    cache, sub = DiskCache(tmp_path, storage_dtype=storage), small_subspace()
    assert isinstance(cache, WritableSubspaceCache)
    cache.put("fp", "k", 8, sub, method="batched")
    early = cache.lookup("fp", "k", 8, method="batched")  # queued or written: the same values
    cache.flush()
    assert cache.path_for("fp", "k", 8, method="batched").is_file()
    late = DiskCache(tmp_path, storage_dtype=storage).lookup("fp", "k", 8, method="batched")
    assert early is not None and late is not None
    for a, b in ((early.U, late.U), (early.S, late.S), (early.V, late.V)):
        assert torch.equal(a, b) and a.dtype == torch.float32 and a.device.type == "cpu"
    if storage == torch.float32:
        assert torch.equal(late.U, sub.U) and torch.equal(late.V, sub.V)
    assert torch.equal(late.S, sub.S)
    assert cache.lookup("fp", "k", 8) is None  # the default method's key is another file
    assert cache.stats.writes == 1


def test_disk_cache_put_does_not_alias_the_callers_tensors(tmp_path: Path) -> None:
    cache, sub = DiskCache(tmp_path, storage_dtype=torch.float32), small_subspace()
    before = sub.U.clone()
    cache.put("fp", "k", 8, sub)
    sub.U.zero_()  # the caller reuses its buffer before the writer ran
    cache.flush()
    found = DiskCache(tmp_path, storage_dtype=torch.float32).lookup("fp", "k", 8)
    assert found is not None and torch.equal(found.U, before)


def test_disk_cache_get_or_compute_hits_a_put_entry(tmp_path: Path) -> None:
    cache, sub = DiskCache(tmp_path), small_subspace()
    cache.put("fp", "k", 8, sub, method="batched")
    calls: list[int] = []
    got = cache.get_or_compute("fp", "k", 8, lambda: calls.append(1) or sub, method="batched")
    assert calls == [] and torch.allclose(got.U, sub.U, atol=1e-3)
    cache.get_or_compute("fp", "k", 8, lambda: calls.append(1) or sub)  # default method: a miss
    assert calls == [1]
    cache.flush()


def test_disk_cache_many_puts_are_all_written(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    subs = [small_subspace(s) for s in range(12)]
    for i, sub in enumerate(subs):
        cache.put("fp", f"k{i}", 8, sub)
    cache.flush()
    assert cache.stats.writes == 12
    fresh = DiskCache(tmp_path)
    for i, sub in enumerate(subs):
        found = fresh.lookup("fp", f"k{i}", 8)
        assert found is not None and torch.equal(found.S, sub.S)


def test_disk_cache_background_write_failure_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    cache = DiskCache(tmp_path / "c")
    shutil.rmtree(cache.directory)  # removed by a user while a transfer runs
    with caplog.at_level(logging.WARNING, logger="lorax_core.cache"):
        cache.put("fp", "k", 8, small_subspace())
        cache.flush()  # returns although the write failed
    assert "cannot write" in caplog.text
    assert cache.lookup("fp", "k", 8) is None and cache.stats.writes == 0


def test_disk_cache_queued_writes_finish_at_interpreter_exit(tmp_path: Path) -> None:
    code = (
        "import torch\n"
        "from lorax_core.cache import DiskCache\n"
        "from lorax_core.linalg import top_subspace\n"
        f"cache = DiskCache({str(tmp_path)!r})\n"
        "for i in range(20):\n"
        "    cache.put('fp', f'k{i}', 8, top_subspace(torch.randn(40, 24), 8))\n"
        # no flush: the non-daemon writer must still finish before the interpreter exits
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
    cache = DiskCache(tmp_path)
    assert all(cache.lookup("fp", f"k{i}", 8) is not None for i in range(20))
