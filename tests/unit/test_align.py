"""Aligned transfer (lorax_core.align): a target with one side of a layer in another basis.

Synthetic re-parameterisations of the quality benchmark's ``reparam`` kind: ``W_t = P W_s``
(hidden units on the output side permuted), ``W_t = W_s Pᵀ`` (input side), or a rotation of
one side, optionally followed by a small perturbation (a fine-tune). The right transferred
update is then ``P ΔW`` (``ΔW Pᵀ``). Tolerances: float32 maths against float64 references,
1e-4 (``tol``) for exact cases; the perturbed cases state their own bound.
"""

from __future__ import annotations

import re

import pytest
import torch

from lorax_core.align import (
    align_factors,
    align_rank,
    alignment_test,
    estimate_map,
    polar,
)
from lorax_core.errors import NothingTransferableError, OptionError, ShapeMismatchError
from lorax_core.linalg import top_subspace
from lorax_core.similarity import similarity_rank
from lorax_core.transfer import transfer_adapter, transfer_lora_layer
from lorax_core.types import DictWeights, LoraFactors, LoraXFactors, SkipReason, TransferOptions

KEY = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
R = 24  # transfer rank: well below the 96–128-wide layers here


def _perm(n: int, rng: torch.Generator) -> torch.Tensor:
    return torch.eye(n)[torch.randperm(n, generator=rng)]


def _out(result, key: str = KEY) -> torch.Tensor:
    f = result.layers[key]
    return f.up2d().double() @ f.down2d().double()


def _run(layers, W_s, W_t, **options):
    keys = list(layers)
    return transfer_adapter(
        layers,
        DictWeights(dict.fromkeys(keys, W_s) if torch.is_tensor(W_s) else W_s),
        DictWeights(dict.fromkeys(keys, W_t) if torch.is_tensor(W_t) else W_t),
        TransferOptions(**options),
    )


def _full(W_s: torch.Tensor, W_t: torch.Tensor):
    m, n = W_s.reshape(W_s.shape[0], -1).shape
    return top_subspace(W_s, align_rank(m, n)), top_subspace(W_t, align_rank(m, n))


# -- the maths ----------------------------------------------------------------------------------


def test_polar_is_the_nearest_orthogonal_matrix(rng) -> None:
    C = torch.randn(12, 12, generator=rng, dtype=torch.float64)
    Z = polar(C)
    assert torch.allclose(Z.T @ Z, torch.eye(12, dtype=torch.float64), atol=1e-12)
    # Procrustes: tr(Zᵀ C) is the nuclear norm of C, the largest any orthogonal matrix reaches.
    assert float(torch.trace(Z.T @ C)) == pytest.approx(float(torch.linalg.svdvals(C).sum()), rel=1e-12)
    assert torch.allclose(polar(torch.diag(torch.rand(5, generator=rng) + 0.5)), torch.eye(5, dtype=torch.float64))


@pytest.mark.parametrize(("m", "n"), [(128, 96), (96, 128), (112, 112)])
@pytest.mark.parametrize("permutations", [True, False])
def test_target_equal_to_source_returns_the_update_unchanged(
    make_weight, make_factors, helpers, tol, m, n, permutations
) -> None:
    W = make_weight(m, n)
    f = make_factors(m, n, 8, alpha=4.0)
    src, tgt = _full(W, W)
    for side in ("output", "input"):
        side_map = estimate_map(src, tgt, side, permutations=permutations)
        # Z = polar(S² ) = I; the unit matching finds the identity permutation.
        assert torch.allclose(side_map.Z, torch.eye(side_map.rank, dtype=torch.float64), atol=1e-6)
        if permutations:
            assert side_map.is_permutation and torch.equal(side_map.index, torch.arange(side_map.Us.shape[0]))
        up, down = align_factors(f.up * f.scale, f.down, side_map, keep_complement=True)
        assert helpers.rel_err(up.double() @ down.double(), helpers.dense(f)) < tol[torch.float32]
    # Through the public per-layer call and transfer_adapter (method named explicitly).
    g = transfer_lora_layer(f, src, tgt, "align")
    assert helpers.rel_err(g.up.double() @ g.down.double(), helpers.dense(f)) < tol[torch.float32]
    result = _run({KEY: f}, W, W, method="align", rank=R)
    assert helpers.rel_err(_out(result), helpers.dense(f)) < tol[torch.float32]
    assert result.report.layers[0].method == "align"


# -- permuted and rotated sides -----------------------------------------------------------------


@pytest.mark.parametrize("rank", ["R", "full"])
@pytest.mark.parametrize(
    ("m", "n", "side"), [(128, 96, "output"), (96, 128, "output"), (96, 128, "input"), (128, 96, "input")]
)
def test_permuted_side_is_recovered_exactly(make_weight, make_factors, helpers, tol, rng, m, n, side, rank) -> None:
    """W_t = P W_s or W_s Pᵀ → P ΔW or ΔW Pᵀ, for the moved side smaller *and* larger than the rank."""
    W_s = make_weight(m, n)
    P = _perm(m if side == "output" else n, rng)
    W_t = P @ W_s if side == "output" else W_s @ P.T
    f = make_factors(m, n, 8, alpha=8.0)
    dW = helpers.dense(f)
    want = P.double() @ dW if side == "output" else dW @ P.double().T
    Ra = R if rank == "R" else align_rank(m, n)
    src, tgt = top_subspace(W_s, Ra), top_subspace(W_t, Ra)
    test = alignment_test(src, tgt, similarity_rank(Ra, m, n))
    assert test.side == side and test.reparameterised and test.side_map.is_permutation
    g = transfer_lora_layer(f, src, tgt, "align")
    assert helpers.rel_err(g.up.double() @ g.down.double(), want) < tol[torch.float32]
    # The methods that keep ΔW's coordinates push on the wrong units (errors ≈ √2 and ≈ 1).
    for method in ("copy", "exact"):
        other = transfer_lora_layer(f, src, tgt, method)
        assert helpers.rel_err(other.up.double() @ other.down.double(), want) > 0.8


@pytest.mark.parametrize(("m", "n", "side"), [(96, 128, "output"), (128, 96, "input"), (112, 112, "output")])
def test_rotated_side_is_recovered_at_full_rank(
    make_weight, make_factors, make_orthogonal, helpers, tol, m, n, side
) -> None:
    """A rotation of the smaller side: complete bases determine O = polar(W_t W_sᵀ) exactly."""
    W_s = make_weight(m, n)
    Rot = make_orthogonal(m if side == "output" else n)
    W_t = Rot @ W_s if side == "output" else W_s @ Rot.T
    f = make_factors(m, n, 8)
    want = Rot.double() @ helpers.dense(f) if side == "output" else helpers.dense(f) @ Rot.double().T
    src, tgt = _full(W_s, W_t)
    test = alignment_test(src, tgt, similarity_rank(R, m, n))
    assert test.reparameterised and test.side == side and not test.side_map.is_permutation
    assert test.phi_moved < test.threshold <= test.phi_aligned
    g = transfer_lora_layer(f, src, tgt, "align")
    assert helpers.rel_err(g.up.double() @ g.down.double(), want) < tol[torch.float32]
    for method in ("copy", "exact"):
        other = transfer_lora_layer(f, src, tgt, method)
        assert helpers.rel_err(other.up.double() @ other.down.double(), want) > 0.8


def test_rotated_side_below_full_rank_maps_the_top_subspace(make_weight, make_orthogonal, helpers, tol, rng) -> None:
    """At R < min(m, n) a rotation is known on the top-R subspace only: exact for an update there."""
    m, n = 128, 112
    W_s = make_weight(m, n)
    Rot = make_orthogonal(m)
    W_t = Rot @ W_s
    src, tgt = top_subspace(W_s, R), top_subspace(W_t, R)
    inside = LoraFactors(up=src.U @ torch.randn(R, 6, generator=rng), down=torch.randn(6, n, generator=rng))
    want = Rot.double() @ helpers.dense(inside)
    g = transfer_lora_layer(inside, src, tgt, "align")
    assert helpers.rel_err(g.up.double() @ g.down.double(), want) < tol[torch.float32]
    copied = transfer_lora_layer(inside, src, tgt, "copy")
    assert helpers.rel_err(copied.up.double() @ copied.down.double(), want) > 1.0


def test_fine_tuned_after_the_change_of_basis_stays_close(
    make_weight, make_factors, make_orthogonal, helpers, rng
) -> None:
    m, n = 96, 128
    W_s = make_weight(m, n)
    noise = torch.randn(m, n, generator=rng)
    noise *= 0.02 * W_s.norm() / noise.norm()  # a fine-tune: ‖N‖ = 2 % of ‖W‖
    f = make_factors(m, n, 8)
    # A permutation is still matched unit for unit: exact.
    P = _perm(m, rng)
    src, tgt = _full(W_s, P @ W_s + noise)
    g = transfer_lora_layer(f, src, tgt, "align")
    assert helpers.rel_err(g.up.double() @ g.down.double(), P.double() @ helpers.dense(f)) < 1e-4
    # A rotation is estimated by Procrustes: close (0.05 measured on such layers), not exact.
    Rot = make_orthogonal(m)
    src, tgt = _full(W_s, Rot @ W_s + noise)
    test = alignment_test(src, tgt, similarity_rank(R, m, n))
    assert test.reparameterised
    g = transfer_lora_layer(f, src, tgt, "align")
    assert helpers.rel_err(g.up.double() @ g.down.double(), Rot.double() @ helpers.dense(f)) < 0.1


def test_conv_layers_are_flattened_and_keep_their_layout(make_weight, make_factors, helpers, tol, rng) -> None:
    out_c, in_c = 64, 32
    W_s = make_weight(out_c, in_c * 9).reshape(out_c, in_c, 3, 3)
    f = make_factors(out_c, in_c, 8, kernel=(3, 3))
    dW4 = helpers.dense(f).reshape(out_c, in_c, 3, 3)
    p_out, p_in = torch.randperm(out_c, generator=rng), torch.randperm(in_c, generator=rng)
    # Output channels permuted (in_layers.2-like) and input channels permuted (out_layers.3-like:
    # whole 3×3 blocks of the flattened columns move together).
    for W_t, want in ((W_s[p_out], dW4[p_out]), (W_s[:, p_in], dW4[:, p_in])):
        result = _run({KEY: f}, W_s, W_t, rank=16)
        rep = result.report.layers[0]
        assert rep.method == "align" and rep.status == "transferred"
        got = result.layers[KEY]
        assert got.up.shape[2:] == (1, 1) and got.down.shape[1:] == (in_c, 3, 3)
        assert helpers.rel_err(_out(result), want.reshape(out_c, -1)) < tol[torch.float32]


# -- the auto rule --------------------------------------------------------------------------------


def test_auto_aligns_only_what_the_gate_would_skip(make_weight, make_factors, helpers, tol, rng) -> None:
    """Three layers: permuted → align, unchanged → exact (as before), unrelated → skipped."""
    m, n = 96, 128
    keys = [f"diffusion_model.block.{i}.weight" for i in range(3)]
    W = [make_weight(m, n) for _ in range(3)]
    P = _perm(m, rng)
    targets = [P @ W[0], W[1], make_weight(m, n)]
    layers = {k: make_factors(m, n, 8, alpha=4.0) for k in keys}
    result = _run(layers, dict(zip(keys, W, strict=True)), dict(zip(keys, targets, strict=True)), rank=R)
    reps = {r.key: r for r in result.report.layers}
    permuted, unchanged, unrelated = (reps[k] for k in keys)
    assert permuted.status == "transferred" and permuted.method == "align"
    assert re.match(
        r"auto: output side re-parameterised \(Φ=0\.\d\d, aligned Φ=1\.00, input side Φ=1\.00; threshold 0\.\d\d\); "
        rf"aligned by a permutation of the {m} output units",
        permuted.reason,
    ), permuted.reason
    assert helpers.rel_err(_out(result, keys[0]), P.double() @ helpers.dense(layers[keys[0]])) < tol[torch.float32]
    assert unchanged.method == "exact" and unchanged.reason == ""
    assert helpers.rel_err(_out(result, keys[1]), helpers.dense(layers[keys[1]])) < tol[torch.float32]
    assert unrelated.status == "skipped" and unrelated.reason == SkipReason.BELOW.text and unrelated.method == "exact"
    assert set(result.layers) == set(keys[:2])


def test_unrelated_and_doubly_moved_targets_are_still_refused(make_weight, make_factors, make_orthogonal, rng) -> None:
    m, n = 96, 128
    W = make_weight(m, n)
    f = make_factors(m, n, 8)
    both = _perm(m, rng) @ W @ _perm(n, rng).T  # both sides moved: no anchor (a documented limit)
    for W_t in (make_weight(m, n), make_orthogonal(m) @ W @ make_orthogonal(n).T, both):
        test = alignment_test(*_full(W, W_t), similarity_rank(R, m, n))
        assert not test.reparameterised and test.phi_anchor < test.threshold
        for method in ("auto", "align"):
            with pytest.raises(NothingTransferableError, match=re.escape(SkipReason.BELOW.text)):
                _run({KEY: f}, W, W_t, rank=R, method=method)


def test_auto_decomposes_no_more_for_layers_without_an_agreeing_side(make_weight, make_factors, rng) -> None:
    """The alignment's full-rank subspaces are computed only where one side agrees."""
    m, n = 96, 128
    W = make_weight(m, n)
    ranks: list[int] = []

    class CountingCache:
        def get_or_compute(self, fingerprint, key, rank, compute):
            ranks.append(rank)
            return compute()

    layers = {KEY: make_factors(m, n, 8), "x.weight": make_factors(m, n, 8)}
    result = transfer_adapter(
        layers,
        DictWeights({KEY: W, "x.weight": W}),
        DictWeights({KEY: make_weight(m, n), "x.weight": W @ _perm(n, rng).T}),
        TransferOptions(rank=R),
        cache=CountingCache(),
    )
    assert [r.method for r in result.report.layers] == ["exact", "align"]
    assert sorted(ranks) == [R, R, R, R, m, m]  # the unrelated layer: its R-rank subspaces only


def test_force_keeps_the_forced_method_and_related_layers_keep_theirs(make_weight, make_factors, rng) -> None:
    m, n = 96, 128
    W = make_weight(m, n)
    f = make_factors(m, n, 8)
    forced = _run({KEY: f}, W, _perm(m, rng) @ W, rank=R, force=True).report.layers[0]
    assert forced.method == "exact" and forced.reason.startswith("forced")
    noise = torch.randn(m, n, generator=rng)
    near = _run({KEY: f}, W, W + 0.01 * noise * W.norm() / noise.norm(), rank=R).report.layers[0]
    assert near.method == "exact" and "align" not in near.reason


def test_lorax_adapter_on_a_permuted_target(make_weight, helpers, tol, rng) -> None:
    m, n = 112, 96
    W = make_weight(m, n)
    P = _perm(n, rng)
    fx = LoraXFactors(core=torch.randn(R, generator=rng), shape=(m, n))
    sub = top_subspace(W, R)
    dW = (sub.U.double() * fx.core.double()) @ sub.V.double().T
    result = _run({KEY: fx}, W, W @ P.T, rank=R)
    rep = result.report.layers[0]
    assert rep.method == "align" and rep.reason.startswith("auto: input side re-parameterised")
    assert helpers.rel_err(_out(result), dW @ P.double().T) < tol[torch.float32]


def test_a_unit_the_weight_never_uses_falls_back_to_the_rotation(make_weight, make_factors, helpers, rng) -> None:
    m, n = 64, 128
    W_s = make_weight(m, n)
    W_s[5] = 0.0  # a dead output unit: no coordinates, so the weights cannot place it
    P = _perm(m, rng)
    src, tgt = _full(W_s, P @ W_s)
    test = alignment_test(src, tgt, similarity_rank(R, m, n))
    assert test.reparameterised and not test.side_map.is_permutation
    assert test.side_map.describe() == f"a rotation of the top-{m - 1} output directions"
    f = make_factors(m, n, 8)
    up, down = align_factors(f.up, f.down, test.side_map, keep_complement=False)
    # Everything but the dead unit's share arrives on the right units.
    want = P.double() @ helpers.dense(f)
    got = up.double() @ down.double()
    keep = torch.ones(m, dtype=torch.bool)
    keep[int(P[:, 5].argmax())] = False
    assert helpers.rel_err(got[keep], want[keep]) < 1e-4


# -- errors ---------------------------------------------------------------------------------------


def test_error_messages(make_weight, make_factors) -> None:
    W = make_weight(64, 48)
    src, tgt = _full(W, W)
    with pytest.raises(OptionError, match=re.escape("alignment side must be 'output' or 'input'; got 'both'.")):
        estimate_map(src, tgt, "both")  # type: ignore[arg-type]
    other = top_subspace(make_weight(48, 64), 48)
    with pytest.raises(
        ShapeMismatchError,
        match=re.escape(
            "alignment needs source and target subspaces of one layer shape; got source 64×48 and target 48×64."
        ),
    ):
        alignment_test(src, other, 12)
    with pytest.raises(OptionError, match=re.escape("threshold c must be in [0, 1]")):
        alignment_test(src, tgt, 12, 1.5)
    side_map = estimate_map(src, tgt, "output")
    f = make_factors(48, 64, 4)
    with pytest.raises(
        ShapeMismatchError,
        match=re.escape(
            "LoRA factors up (48, 4) and down (4, 64) do not fit an alignment of 64 output units; "
            "estimate the map from this layer's base weights."
        ),
    ):
        align_factors(f.up, f.down, side_map, keep_complement=True)
    with pytest.raises(
        OptionError, match=re.escape("method 'best' is not one of auto, lorax, prolora, exact, project, copy, align")
    ):
        TransferOptions(method="best")  # type: ignore[arg-type]
