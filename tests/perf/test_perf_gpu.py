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
