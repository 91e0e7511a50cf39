"""GPU path: the same subspaces and transfers on CUDA as on the CPU (skips cleanly without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorax_core.cache import DiskCache
from lorax_core.linalg import top_subspace
from lorax_core.transfer import transfer_adapter
from lorax_core.types import DictWeights, LoraFactors, TransferOptions

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _pair() -> tuple[DictWeights, DictWeights, dict[str, LoraFactors]]:
    gen = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(192, 128, generator=gen))
    q2, _ = torch.linalg.qr(torch.randn(128, 128, generator=gen))
    w = q1 @ torch.diag(torch.arange(1, 129, dtype=torch.float32) ** -0.7) @ q2.T
    # A fine-tune-sized change: at 0.01 the noise (spectral norm ≈ 0.25) exceeds the 32nd singular
    # value (≈ 0.09), the subspaces decorrelate (Φ ≈ 0.3 < threshold 0.625) and the CPU reference
    # transfer is refused before any GPU code runs; at 0.001 Φ ≈ 0.97.
    w_t = w + 0.001 * torch.randn(192, 128, generator=gen)
    key = "diffusion_model.layer.weight"
    lora = {key: LoraFactors(up=torch.randn(192, 4, generator=gen), down=torch.randn(4, 128, generator=gen), alpha=2.0)}
    return DictWeights({key: w}), DictWeights({key: w_t}), lora


@pytest.mark.gpu
@needs_cuda
def test_top_subspace_on_cuda_equals_cpu() -> None:
    w = _pair()[0].get("diffusion_model.layer.weight")
    cpu, gpu = top_subspace(w, 32), top_subspace(w, 32, device="cuda")
    assert gpu.U.device.type == "cuda"
    assert torch.allclose(gpu.S.cpu(), cpu.S, rtol=1e-4)
    # Compare projectors (basis-independent); signs are fixed, so the bases agree too.
    assert torch.allclose(gpu.U.cpu() @ gpu.U.cpu().T, cpu.U @ cpu.U.T, atol=1e-4)
    assert torch.allclose(gpu.U.cpu(), cpu.U, atol=1e-3)


def test_pair_is_transferable_on_cpu() -> None:
    """The fixture itself: the CPU reference must transfer (it did not, unnoticed, while no GPU ran)."""
    source, target, lora = _pair()
    assert transfer_adapter(lora, source, target, TransferOptions(rank=32)).report.totals()["transferred"] == 1


@pytest.mark.gpu
@needs_cuda
def test_transfer_on_cuda_equals_cpu_and_returns_cpu_factors(tmp_path: Path) -> None:
    source, target, lora = _pair()
    cpu = transfer_adapter(lora, source, target, TransferOptions(rank=32))
    gpu = transfer_adapter(lora, source, target, TransferOptions(rank=32, device="cuda"), cache=DiskCache(tmp_path))
    again = transfer_adapter(lora, source, target, TransferOptions(rank=32, device="cuda"), cache=DiskCache(tmp_path))
    for result in (gpu, again):  # computed on the GPU, then served from the (CPU) disk cache
        ((key, got),) = result.layers.items()
        want = cpu.layers[key]
        assert got.up.device.type == "cpu"
        dw_got, dw_want = got.up2d() @ got.down2d(), want.up2d() @ want.down2d()
        assert float((dw_got - dw_want).norm() / dw_want.norm()) < 2e-3


# -- batched float32 decomposition (lorax_core.batched) --------------------------------------------


def _power_law(m: int, n: int, seed: int) -> torch.Tensor:
    """A weight with singular values ``i^-0.7`` (a trained layer's slow decay; small gaps at R)."""
    gen = torch.Generator().manual_seed(seed)
    d = min(m, n)
    p, _ = torch.linalg.qr(torch.randn(m, d, generator=gen, dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=torch.float64))
    return ((p * torch.arange(1, d + 1, dtype=torch.float64) ** -0.7) @ q.T).to(torch.float32)


def _projector_error(A: torch.Tensor, B: torch.Tensor) -> float:
    """``‖AAᵀ − BBᵀ‖_F / √R`` from R×R products."""
    A, B = A.double().cpu(), B.double().cpu()
    sq = (A.T @ A).square().sum() + (B.T @ B).square().sum() - 2 * (A.T @ B).square().sum()
    return float(sq.clamp_min(0.0).sqrt() / A.shape[1] ** 0.5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    ("shape", "rank", "dtype"),
    [
        ((1280, 1280), 320, torch.float32),
        ((640, 2048), 320, torch.float32),
        ((2048, 640), 320, torch.float16),
        ((1280, 1280), 1280, torch.float32),  # a complete basis (align's rank)
    ],
)
def test_batched_on_cuda_matches_float64_and_the_cpu_path(
    shape: tuple[int, int], rank: int, dtype: torch.dtype
) -> None:
    from lorax_core.batched import BatchStats, top_subspaces_batched
    from lorax_core.linalg import Subspace

    weights = [_power_law(*shape, seed=s).to(dtype) for s in range(3)]
    stats = BatchStats()
    results = top_subspaces_batched(weights, rank, device="cuda", stats=stats)
    # On realistic spectra no layer should need the float64 fallback (else the tolerance is off for CUDA).
    assert stats.fallbacks == 0 and stats.batches >= 1
    for w, got in zip(weights, results, strict=True):
        assert isinstance(got, Subspace) and got.U.device.type == "cuda" and got.U.dtype == torch.float32
        U0, S0, Vh0 = torch.linalg.svd(w.double(), full_matrices=False)
        assert _projector_error(got.U, U0[:, :rank]) <= 1e-3
        assert _projector_error(got.V, Vh0[:rank].T) <= 1e-3
        assert float(((got.S.double().cpu() - S0[:rank]).abs() / S0[:rank]).max()) <= 1e-4
        cpu = top_subspace(w, rank)
        assert _projector_error(got.U, cpu.U) <= 1e-3
        assert torch.allclose(got.U[:, :16].cpu(), cpu.U[:, :16], atol=1e-4)  # same signs as the CPU path


@pytest.mark.gpu
@needs_cuda
def test_batched_on_cuda_ignores_a_hosts_tf32_setting() -> None:
    from lorax_core.batched import BatchStats, top_subspaces_batched

    matmul = torch.backends.cuda.matmul
    name, tf32 = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    before = getattr(matmul, name)
    setattr(matmul, name, tf32)  # what a host may do for speed
    try:
        stats = BatchStats()
        w = _power_law(1280, 1280, seed=0)
        (got,) = top_subspaces_batched([w], 320, device="cuda", stats=stats)
        assert getattr(matmul, name) == tf32  # restored
    finally:
        setattr(matmul, name, before)
    assert stats.fallbacks == 0
    assert _projector_error(got.U, top_subspace(w, 320).U) <= 1e-3  # type: ignore[union-attr]


@pytest.mark.gpu
@needs_cuda
def test_prefetch_and_get_on_cuda(tmp_path: Path) -> None:
    from lorax_core.subspaces import SubspaceProvider

    shapes = {"a.weight": (640, 2048), "b.weight": (640, 2048), "c.weight": (1280, 1280), "d.weight": (320, 320)}
    model = {key: _power_law(*shape, seed=i) for i, (key, shape) in enumerate(shapes.items())}
    reads: list[str] = []

    class Counting(DictWeights):
        def get(self, key: str) -> torch.Tensor:
            reads.append(key)
            return super().get(key)

    requests = [(key, min(320, *shape)) for key, shape in shapes.items()]
    for cache in (None, DiskCache(tmp_path)):
        reads.clear()
        weights = Counting(model, fingerprint="model")
        provider = SubspaceProvider(cache, "cuda")
        assert provider.batched  # the default on CUDA
        provider.prefetch(weights, requests)
        assert sorted(reads) == sorted(shapes)
        for key, rank in requests:
            got = provider.get(weights, key, rank)
            assert got.U.device.type == "cuda"
            cpu = top_subspace(model[key], rank)
            assert torch.allclose(got.S.cpu(), cpu.S, rtol=1e-4)
            assert _projector_error(got.U, cpu.U) <= 2e-3  # float16 disk storage adds ≈ 5e-4
        assert len(reads) == len(shapes)  # every get served from the prefetch
        assert provider.batch_stats.fallbacks == 0
