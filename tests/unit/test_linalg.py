"""top_subspace, flatten_weight, recompress and factored_norm."""

from __future__ import annotations

import re

import pytest
import torch

from lorax_core.errors import OptionError, RankError, ShapeMismatchError
from lorax_core.linalg import Subspace, factored_norm, flatten_weight, recompress, top_subspace


def _reference(W: torch.Tensor, R: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return U[:, :R], S[:R], Vh[:R].T


@pytest.mark.parametrize("method", ["gram", "svd"])
@pytest.mark.parametrize("shape", [(96, 96), (64, 200), (200, 64)])
def test_top_subspace_matches_float64_reference(make_weight, method, shape) -> None:
    W = make_weight(*shape)
    sub = top_subspace(W, 32, method=method)
    U, S, V = _reference(W, 32)
    assert sub.U.dtype == sub.S.dtype == sub.V.dtype == torch.float32
    assert sub.U.shape == (shape[0], 32) and sub.V.shape == (shape[1], 32) and sub.S.shape == (32,)
    assert torch.allclose(sub.S.double(), S, rtol=1e-4)
    # Same subspaces: the projections agree (independent of signs and bases).
    assert torch.allclose(sub.U.double() @ sub.U.double().T, U @ U.T, atol=1e-4)
    assert torch.allclose(sub.V.double() @ sub.V.double().T, V @ V.T, atol=1e-4)
    # Orthonormal columns and U S Vᵀ reproduces the rank-32 truncation.
    assert torch.allclose(sub.U.T @ sub.U, torch.eye(32), atol=1e-4)
    assert torch.allclose(sub.V.T @ sub.V, torch.eye(32), atol=1e-4)
    assert torch.allclose((sub.U * sub.S) @ sub.V.T, ((U * S) @ V.T).float(), atol=1e-4)


def test_lowrank_method_returns_an_orthonormal_top_subspace(make_weight) -> None:
    W = make_weight(128, 128, decay=12.0)  # fast decay: the randomized method is accurate here
    sub = top_subspace(W, 16, method="lowrank")
    U, _, _ = _reference(W, 16)
    assert torch.allclose(sub.U.T @ sub.U, torch.eye(16), atol=1e-4)
    assert float((sub.U.double().T @ U).pow(2).sum()) / 16 > 0.999


def test_signs_are_deterministic_across_methods(make_weight) -> None:
    W = make_weight(80, 120)
    a, b = top_subspace(W, 20, method="gram"), top_subspace(W, 20, method="svd")
    assert torch.allclose(a.U, b.U, atol=1e-4) and torch.allclose(a.V, b.V, atol=1e-4)
    idx = a.U.abs().argmax(dim=0)
    assert bool((a.U[idx, torch.arange(20)] > 0).all())


def test_rank_is_clipped_and_full_rank_basis_is_complete(make_weight) -> None:
    W = make_weight(64, 96)
    sub = top_subspace(W, 320)
    assert sub.rank == 64
    assert torch.allclose(sub.U @ sub.U.T, torch.eye(64), atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_precision_input_is_decomposed_in_float32(make_weight, dtype) -> None:
    W = make_weight(64, 64).to(dtype)
    sub = top_subspace(W, 16)
    assert sub.U.dtype == torch.float32
    U, _, _ = _reference(W.float(), 16)
    assert float((sub.U.double().T @ U).pow(2).sum()) / 16 > 1 - 1e-4


def test_conv_weight_is_flattened(make_weight) -> None:
    W = make_weight(32, 16 * 9).reshape(32, 16, 3, 3)
    assert flatten_weight(W).shape == (32, 144)
    assert top_subspace(W, 8).V.shape == (144, 8)


def test_zero_and_rank_deficient_weights_give_orthonormal_bases(make_orthogonal) -> None:
    zero = top_subspace(torch.zeros(40, 60), 10)
    assert torch.allclose(zero.V.T @ zero.V, torch.eye(10), atol=1e-5)
    assert float(zero.S.abs().max()) == 0.0
    low = make_orthogonal(40, 3) @ make_orthogonal(60, 3).T  # rank 3, asked for 10
    sub = top_subspace(low, 10)
    assert torch.allclose(sub.V.T @ sub.V, torch.eye(10), atol=1e-4)
    assert torch.allclose(sub.S[:3], torch.ones(3), atol=1e-4)


def test_subspace_truncate_and_input_untouched(make_weight) -> None:
    W = make_weight(50, 70)
    before = W.clone()
    sub = top_subspace(W, 20)
    assert torch.equal(W, before)
    t = sub.truncate(5)
    assert isinstance(t, Subspace) and t.rank == 5 and t.shape == (50, 70)
    assert torch.equal(t.U, sub.U[:, :5])


def test_top_subspace_errors() -> None:
    with pytest.raises(
        RankError, match=re.escape("subspace rank must be a positive integer (the paper uses 320); got 0")
    ):
        top_subspace(torch.ones(4, 4), 0)
    with pytest.raises(OptionError, match=re.escape("SVD method 'qr' is not one of gram, svd, lowrank")):
        top_subspace(torch.ones(4, 4), 2, method="qr")  # type: ignore[arg-type]
    with pytest.raises(ShapeMismatchError, match=re.escape("base weight of shape (4,) is neither linear")):
        flatten_weight(torch.ones(4))


def test_factored_norm_equals_dense_norm(make_factors, helpers) -> None:
    f = make_factors(48, 80, 6, alpha=3.0)
    assert factored_norm(f.up2d(), f.down2d(), f.scale) == pytest.approx(float(helpers.dense(f).norm()), rel=1e-9)
    assert factored_norm(torch.zeros(5, 0), torch.zeros(0, 7)) == 0.0


def test_recompress_keeps_product_and_finds_true_rank(make_factors, helpers) -> None:
    f = make_factors(60, 90, 5)
    up = torch.cat([f.up, 2 * f.up], dim=1)  # 10 columns, rank 5
    down = torch.cat([f.down, 0.5 * f.down], dim=0)
    new_up, new_down, kept = recompress(up, down, None)
    assert new_up.shape == (60, 5) and new_down.shape == (5, 90)
    assert kept == pytest.approx(1.0)
    assert helpers.rel_err(new_up @ new_down, up @ down) < 1e-5


def test_recompress_truncation_reports_energy(make_factors) -> None:
    f = make_factors(60, 90, 8)
    dW = (f.up @ f.down).double()
    s = torch.linalg.svdvals(dW)
    up, down, kept = recompress(f.up, f.down, 3)
    assert up.shape[1] == 3
    assert kept == pytest.approx(float((s[:3] ** 2).sum() / (s**2).sum()), rel=1e-5)
    # Eckart–Young: the error is exactly the discarded singular values.
    err = float((up.double() @ down.double() - dW).norm())
    assert err == pytest.approx(float(s[3:].pow(2).sum().sqrt()), rel=1e-3)


def test_recompress_zero_and_errors(make_factors) -> None:
    up, down, kept = recompress(torch.zeros(6, 2), torch.zeros(2, 9), None)
    assert up.shape == (6, 0) and down.shape == (0, 9) and kept == 1.0
    f = make_factors(30, 40, 4)
    cancelled = recompress(torch.cat([f.up, f.up], 1), torch.cat([f.down, -f.down], 0), None)
    assert cancelled[0].shape == (30, 0)
    with pytest.raises(RankError, match=re.escape("output rank must be a positive integer or None; got 0")):
        recompress(torch.ones(3, 1), torch.ones(1, 3), 0)
