"""Shared fixtures: seeded randomness, synthetic weights with realistic spectra, LoRA factories.

Every factory is a fixture returning a function, seeded per test (``rng``), so tests are
reproducible and independent of their order. Matrices stay 64–256 wide (2 shared CPU cores).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lorax_core.types import LoraFactors

#: Relative Frobenius-error tolerance per dtype (LyCORIS' EPS_DTYPE idea): float32 maths is
#: compared at 1e-4; results cast to half precision lose ~3 (fp16) or ~2 (bf16) decimal digits.
TOL: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture
def tol() -> dict[torch.dtype, float]:
    return TOL


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def make_orthogonal(rng: torch.Generator) -> Callable[..., torch.Tensor]:
    """``make_orthogonal(n, k=None)``: an (n, k) matrix with orthonormal columns (k = n by default)."""

    def make(n: int, k: int | None = None) -> torch.Tensor:
        q, r = torch.linalg.qr(torch.randn(n, k or n, generator=rng, dtype=torch.float64))
        # Fix QR's sign ambiguity so the matrix is Haar-distributed.
        return (q * torch.sign(torch.diagonal(r))).to(torch.float32)

    return make


@pytest.fixture
def make_weight(make_orthogonal: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``make_weight(m, n, decay=4.0)``: W = P·diag(s)·Qᵀ with s_i = exp(−decay·i/d), d = min(m, n).

    A smooth, distinct spectrum like a trained layer's (decay 4: s_d/s_1 ≈ 0.018), so the top-R
    subspaces are well defined (clear gaps) and reproducible.
    """

    def make(m: int, n: int, decay: float = 4.0) -> torch.Tensor:
        d = min(m, n)
        s = torch.exp(-decay * torch.arange(d, dtype=torch.float32) / d)
        return (make_orthogonal(m, d) * s) @ make_orthogonal(n, d).T

    return make


@pytest.fixture
def make_factors(rng: torch.Generator) -> Callable[..., LoraFactors]:
    """``make_factors(out, in_, rank, alpha=None, kernel=None)``: a random LoRA layer.

    ``kernel=(kh, kw)`` makes a conv layer: up (out, r, 1, 1), down (r, in_, kh, kw).
    """

    def make(
        out: int, in_: int, rank: int, alpha: float | None = None, kernel: tuple[int, int] | None = None
    ) -> LoraFactors:
        up = torch.randn(out, rank, generator=rng) / rank**0.5
        down = torch.randn(rank, in_ * (kernel[0] * kernel[1] if kernel else 1), generator=rng) / in_**0.5
        if kernel is not None:
            return LoraFactors(up=up.reshape(out, rank, 1, 1), down=down.reshape(rank, in_, *kernel), alpha=alpha)
        return LoraFactors(up=up, down=down, alpha=alpha)

    return make


def dense(f: LoraFactors) -> torch.Tensor:
    """ΔW = scale·up@down as a float64 (out, in·kh·kw) matrix (tests only: small layers)."""
    return f.scale * (f.up2d().double() @ f.down2d().double())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖_F / ‖b‖_F in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture
def helpers() -> type:
    """``helpers.dense(f)`` and ``helpers.rel_err(a, b)`` for test modules."""

    class Helpers:
        dense = staticmethod(dense)
        rel_err = staticmethod(rel_err)

    return Helpers
