"""Per-layer transfers and transfer_adapter: properties on synthetic weights (issue 2, "Tests")."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lorax_core.errors import (
    LayerSkippedError,
    NothingTransferableError,
    OptionError,
    RankError,
    ShapeMismatchError,
)
from lorax_core.linalg import top_subspace
from lorax_core.similarity import compute_similarity
from lorax_core.transfer import (
    SkipReason,
    choose_method,
    lorax_to_lora,
    transfer_adapter,
    transfer_lora_layer,
    transfer_lorax_layer,
)
from lorax_core.types import DictWeights, LoraFactors, LoraXFactors, TransferOptions

KEY = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
R = 24  # transfer rank in these tests: well below the 96–128-wide layers


def _dense_lorax(f: LoraXFactors, W: torch.Tensor) -> torch.Tensor:
    sub = top_subspace(W, f.rank)
    core = torch.diag(f.core) if f.core.ndim == 1 else f.core
    return (sub.U.double() @ core.double()) @ sub.V.double().T


def _out(result, key: str = KEY) -> torch.Tensor:
    f = result.layers[key]
    assert f.alpha is None
    return f.up2d().double() @ f.down2d().double()


def _run(layer, W_s, W_t, key: str = KEY, **options):
    return transfer_adapter({key: layer}, DictWeights({key: W_s}), DictWeights({key: W_t}), TransferOptions(**options))


# -- identity: source == target ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["exact", "copy"])
def test_identity_exact_and_copy_return_the_input(make_weight, make_factors, helpers, tol, method) -> None:
    W = make_weight(128, 96)
    f = make_factors(128, 96, 8, alpha=4.0)
    result = _run(f, W, W, method=method, rank=R)
    assert helpers.rel_err(_out(result), helpers.dense(f)) < tol[torch.float32]
    rep = result.report.layers[0]
    assert rep.status == "transferred" and rep.method == method and rep.output_rank == 8
    assert rep.norm_target == pytest.approx(rep.norm_source, rel=1e-4)


def test_identity_lorax_adapter_comes_back_unchanged(make_weight, helpers, tol) -> None:
    W = make_weight(112, 112)
    f = LoraXFactors(core=torch.linspace(1.0, 0.1, R), shape=(112, 112))
    result = _run(f, W, W, rank=R)
    assert result.report.layers[0].method == "lorax"
    assert helpers.rel_err(_out(result), _dense_lorax(f, W)) < tol[torch.float32]
    full = LoraXFactors(core=torch.randn(R, R, generator=torch.Generator().manual_seed(3)), shape=(112, 112))
    assert helpers.rel_err(_out(_run(full, W, W, rank=R)), _dense_lorax(full, W)) < tol[torch.float32]


def test_identity_prolora_loses_exactly_the_cross_blocks_it_reports(make_weight, make_factors, helpers) -> None:
    W = make_weight(128, 128)
    f = make_factors(128, 128, 8)
    result = _run(f, W, W, method="prolora", rank=R)
    rep = result.report.layers[0]
    sub = top_subspace(W, R)
    Pu, Pv = sub.U.double() @ sub.U.double().T, sub.V.double() @ sub.V.double().T
    dW = helpers.dense(f)
    eye = torch.eye(128, dtype=torch.float64)
    cross = Pu @ dW @ (eye - Pv) + (eye - Pu) @ dW @ Pv
    lost = float((dW - _out(result)).pow(2).sum())
    assert lost == pytest.approx(float(cross.pow(2).sum()), rel=1e-3)
    # ...and the report states it: the blocks are orthogonal, so ‖ΔW_s‖² − ‖ΔW_t‖² is the loss.
    assert rep.norm_source**2 - rep.norm_target**2 == pytest.approx(lost, rel=1e-3)
    assert lost > 0.05 * rep.norm_source**2  # a random LoRA has real energy in the cross blocks


# -- subspace-preserving target ------------------------------------------------------------------


def test_subspace_preserving_target_transfers_lorax_exactly(make_orthogonal, helpers, tol) -> None:
    P, Q = make_orthogonal(120, 120), make_orthogonal(100, 100)
    s = torch.exp(-4.0 * torch.arange(100) / 100)
    W_s = (P[:, :100] * s) @ Q.T
    W_t = (P[:, :100] * (s * 1.7 + 0.05 * s.flip(0).cumsum(0).flip(0) / 100)) @ Q.T  # same vectors, other values
    f = LoraXFactors(core=torch.randn(R, generator=torch.Generator().manual_seed(0)), shape=(120, 100))
    result = _run(f, W_s, W_t, rank=R)
    assert helpers.rel_err(_out(result), _dense_lorax(f, W_s)) < tol[torch.float32]
    rep = result.report.layers[0]
    assert rep.phi_left == pytest.approx(1.0, abs=1e-4) and rep.phi_right == pytest.approx(1.0, abs=1e-4)


# -- continuity ----------------------------------------------------------------------------------


def test_continuity_as_target_approaches_source(make_weight, make_factors, helpers, rng) -> None:
    W = make_weight(96, 80)
    noise = torch.randn(96, 80, generator=rng) / 80**0.5
    f = make_factors(96, 80, 8)
    fx = LoraXFactors(core=torch.randn(R, generator=rng), shape=(96, 80))
    want_exact, want_lorax = helpers.dense(f), _dense_lorax(fx, W)
    errors_exact, errors_lorax, phis = [], [], []
    for eps in (1e-1, 1e-2, 1e-4):
        W_t = W + eps * noise
        res = transfer_adapter(
            {KEY: f, "x.weight": fx},
            DictWeights({KEY: W, "x.weight": W}),
            DictWeights({KEY: W_t, "x.weight": W_t}),
            TransferOptions(rank=R, force=True),
        )
        errors_exact.append(helpers.rel_err(_out(res), want_exact))
        errors_lorax.append(helpers.rel_err(_out(res, "x.weight"), want_lorax))
        phis.append(min(res.report.layers[0].phi_left, res.report.layers[0].phi_right))
    for errors in (errors_exact, errors_lorax):
        assert errors[0] > errors[1] > errors[2]
        assert errors[-1] < 1e-3
    assert phis[0] <= phis[1] <= phis[2] and phis[-1] > 0.9999


# -- negative control ------------------------------------------------------------------------------


def test_rotated_target_scores_chance_and_is_skipped(make_weight, make_factors, make_orthogonal) -> None:
    W = make_weight(128, 128)
    W_t = make_orthogonal(128) @ W @ make_orthogonal(128).T
    f = make_factors(128, 128, 8)
    with pytest.raises(NothingTransferableError, match=re.escape(SkipReason.BELOW.text)):
        _run(f, W, W_t, rank=R)
    forced = _run(f, W, W_t, rank=R, force=True)
    rep = forced.report.layers[0]
    assert rep.status == "transferred" and "forced" in rep.reason
    assert rep.chance == pytest.approx(R / 128)
    assert abs(rep.phi_left - rep.chance) < 0.12 and abs(rep.phi_right - rep.chance) < 0.12
    assert min(rep.phi_left, rep.phi_right) < rep.threshold
    # The skip is reported (not raised) when another layer transfers.
    other = "diffusion_model.out.2.weight"
    result = transfer_adapter(
        {KEY: f, other: f},
        DictWeights({KEY: W, other: W}),
        DictWeights({KEY: W_t, other: W}),
        TransferOptions(rank=R),
    )
    skipped = result.report.skipped
    assert [r.key for r in skipped] == [KEY] and skipped[0].reason == SkipReason.BELOW.text
    assert list(result.layers) == [other]


# -- shapes, ranks, conv, dtypes ------------------------------------------------------------------


@pytest.mark.parametrize(("method", "max_rank"), [("copy", 8), ("project", 8), ("exact", 8), ("prolora", 16)])
def test_factor_ranks(make_weight, make_factors, rng, method, max_rank) -> None:
    W = make_weight(128, 96)
    W_t = W + 0.05 * torch.randn(128, 96, generator=rng) / 96**0.5
    res = _run(make_factors(128, 96, 8), W, W_t, method=method, rank=R)
    layer, rep = res.layers[KEY], res.report.layers[0]
    assert layer.rank == rep.output_rank <= max_rank
    assert rep.energy_kept == pytest.approx(1.0)
    small = _run(make_factors(128, 96, 8), W, W_t, method=method, rank=R, output_rank=3)
    assert small.layers[KEY].rank == 3 and 0.0 < small.report.layers[0].energy_kept < 1.0


def test_lorax_output_rank_and_complete_basis_note(make_weight) -> None:
    W = make_weight(64, 64)
    f = LoraXFactors(core=torch.ones(64), shape=(64, 64))
    rep = _run(f, W, W, rank=64).report.layers[0]
    assert rep.output_rank == 64 and "projection is the identity (a copy)" in rep.reason
    assert rep.similarity_rank == 16 and "similarity decided at rank 16" in rep.reason


@pytest.mark.parametrize("kernel", [(1, 1), (3, 3)])
def test_conv_layers_keep_conv_shapes(make_weight, make_factors, helpers, tol, kernel) -> None:
    out, cin = 64, 32
    W = make_weight(out, cin * kernel[0] * kernel[1]).reshape(out, cin, *kernel)
    f = make_factors(out, cin, 6, alpha=3.0, kernel=kernel)
    res = _run(f, W, W, key="diffusion_model.input_blocks.1.0.in_layers.2.weight", rank=16)
    layer = res.layers["diffusion_model.input_blocks.1.0.in_layers.2.weight"]
    assert layer.up.shape == (out, 6, 1, 1) and layer.down.shape == (6, cin, *kernel)
    assert helpers.rel_err(layer.up2d().double() @ layer.down2d().double(), helpers.dense(f)) < tol[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtype_round_trip(make_weight, make_factors, helpers, tol, dtype) -> None:
    W = make_weight(96, 96).to(dtype)
    f32 = make_factors(96, 96, 8, alpha=8.0)
    f = LoraFactors(up=f32.up.to(dtype), down=f32.down.to(dtype), alpha=8.0)
    res = _run(f, W, W, rank=R)
    layer = res.layers[KEY]
    assert layer.up.dtype == layer.down.dtype == dtype and layer.up.device.type == "cpu"
    assert helpers.rel_err(_out(res), helpers.dense(f)) < tol[dtype]
    fx = LoraXFactors(core=torch.ones(R, dtype=dtype), shape=(96, 96))
    assert _run(fx, W, W, rank=R).layers[KEY].up.dtype == dtype


def test_inputs_are_never_mutated(make_weight, make_factors, rng) -> None:
    W_s = make_weight(96, 96)
    W_t = W_s + 0.01 * torch.randn(96, 96, generator=rng)
    f = make_factors(96, 96, 8, alpha=2.0)
    fx = LoraXFactors(core=torch.randn(R, generator=rng), shape=(96, 96))
    keys = (KEY, "diffusion_model.x.weight")
    before = [t.clone() for t in (W_s, W_t, f.up, f.down, fx.core)]
    for method in ("exact", "prolora", "project", "copy"):
        transfer_adapter(
            {keys[0]: f, keys[1]: fx},
            DictWeights(dict.fromkeys(keys, W_s)),
            DictWeights(dict.fromkeys(keys, W_t)),
            TransferOptions(method=method, rank=R),
        )
    after = (W_s, W_t, f.up, f.down, fx.core)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_zero_lora_is_reported_not_crashed(make_weight, make_factors) -> None:
    W = make_weight(64, 64)
    zero = LoraFactors(up=torch.zeros(64, 4), down=torch.zeros(4, 64))
    live = make_factors(64, 64, 4)
    other = "diffusion_model.y.weight"
    res = transfer_adapter(
        {KEY: zero, other: live},
        DictWeights({KEY: W, other: W}),
        DictWeights({KEY: W, other: W}),
        TransferOptions(rank=16),
    )
    rep = {r.key: r for r in res.report.layers}
    assert rep[KEY].status == "skipped" and rep[KEY].reason == SkipReason.ZERO.text and rep[KEY].norm_source == 0.0
    assert list(res.layers) == [other]
    with pytest.raises(
        NothingTransferableError, match=re.escape(f"most common reason (1 layers): {SkipReason.ZERO.text}")
    ):
        _run(zero, W, W)


# -- transfer_adapter bookkeeping ----------------------------------------------------------------


def test_report_records_every_layer_and_progress(make_weight, make_factors) -> None:
    W = make_weight(64, 64)
    wide = make_weight(64, 128)
    keys = [
        "diffusion_model.a.to_q.weight",
        "diffusion_model.b.to_k.weight",
        "diffusion_model.c.to_v.weight",
        "diffusion_model.d.to_out.0.weight",
    ]
    source = DictWeights({keys[0]: W, keys[1]: W, keys[2]: W})
    target = DictWeights({keys[0]: W, keys[1]: wide, keys[2]: W})
    layers = {
        keys[0]: make_factors(64, 64, 4),
        keys[1]: make_factors(64, 64, 4),  # target is wider → width mismatch
        keys[2]: make_factors(64, 32, 4),  # does not fit the source weight
        keys[3]: make_factors(64, 64, 4),  # not in the source model
    }
    seen: list[tuple[int, int]] = []
    res = transfer_adapter(
        layers,
        source,
        target,
        TransferOptions(rank=16, match="name"),
        names={keys[0]: "lora_unet_a_to_q"},
        skipped={"lora_unet_loha_layer": "LoHa layers are not supported"},
        progress=lambda d, t: seen.append((d, t)),
    )
    assert seen == [(i, 5) for i in range(1, 6)]
    rep = {r.key: r for r in res.report.layers}
    assert rep["lora_unet_a_to_q"].status == "transferred" and rep["lora_unet_a_to_q"].source_key == keys[0]
    assert rep[keys[1]].reason == SkipReason.WIDTH.text and rep[keys[1]].target_shape == (64, 128)
    assert rep[keys[2]].reason == SkipReason.SOURCE_SHAPE.text
    assert rep[keys[3]].reason == SkipReason.NO_SOURCE.text
    assert rep["lora_unet_loha_layer"].reason == "LoHa layers are not supported"
    # Each skip is also a value (the report's "code"), so no caller has to compare message text.
    codes = {key: r.code for key, r in rep.items()}
    assert codes == {
        "lora_unet_a_to_q": "",
        keys[1]: SkipReason.WIDTH,
        keys[2]: SkipReason.SOURCE_SHAPE,
        keys[3]: SkipReason.NO_SOURCE,
        "lora_unet_loha_layer": SkipReason.UNRESOLVED,
    }
    data = json.loads(res.report.to_json())
    assert {layer["key"]: layer["code"] for layer in data["layers"]}[keys[1]] == "width"
    assert data["totals"]["transferred"] == 1 and data["totals"]["skipped"] == 4
    assert set(data["layers"][0]) >= {
        "key",
        "source_key",
        "target_key",
        "source_shape",
        "target_shape",
        "method",
        "status",
        "reason",
        "phi_left",
        "phi_right",
        "chance",
        "similarity_rank",
        "threshold",
        "norm_source",
        "norm_target",
        "energy_kept",
        "output_rank",
    }


def test_strict_mode_raises_on_the_first_skip(make_weight, make_factors) -> None:
    W = make_weight(64, 64)
    f = make_factors(64, 64, 4)
    with pytest.raises(
        LayerSkippedError,
        match=re.escape(f"layer {KEY}: skipped because {SkipReason.WIDTH.text} (source (64, 64) vs target (64, 128))"),
    ):
        _run(f, W, make_weight(64, 128), rank=16, strict=True, match="name")
    with pytest.raises(LayerSkippedError, match=re.escape("layer lora_unet_x: skipped because unknown key")):
        transfer_adapter(
            {KEY: f},
            DictWeights({KEY: W}),
            DictWeights({KEY: W}),
            TransferOptions(strict=True),
            skipped={"lora_unet_x": "unknown key"},
        )


def test_cache_protocol_and_similarity_table_are_used(make_weight, make_factors) -> None:
    W = make_weight(64, 64)
    calls: list[tuple[str, str, int]] = []

    class CountingCache:
        def get_or_compute(self, fingerprint, key, rank, compute):
            calls.append((fingerprint, key, rank))
            return compute()

    source, target = DictWeights({KEY: W}, fingerprint="s"), DictWeights({KEY: W}, fingerprint="t")
    table = compute_similarity(source, target, [(KEY, KEY)], rank=16)
    table.entries[0].phi_left = 0.1  # a reused table decides, so this (fake) value must show up
    res = transfer_adapter(
        {KEY: make_factors(64, 64, 4)},
        source,
        target,
        TransferOptions(rank=16, force=True),
        similarity=table,
        cache=CountingCache(),
    )
    assert res.report.layers[0].phi_left == 0.1 and "forced" in res.report.layers[0].reason
    assert calls == [("s", KEY, 16), ("t", KEY, 16)]


# -- errors ----------------------------------------------------------------------------------------


def test_nothing_transferable_message_names_count_reason_and_fix(make_weight, make_factors, make_orthogonal) -> None:
    W = make_weight(64, 64)
    W_t = make_orthogonal(64) @ W @ make_orthogonal(64).T
    layers = {f"diffusion_model.l{i}.to_q.weight": make_factors(64, 64, 4) for i in range(3)}
    weights = dict.fromkeys(layers, W)
    expected = (
        f"none of the 3 layers was transferred; most common reason (3 layers): {SkipReason.BELOW.text}. "
        "Fix: lower the threshold (now 0.5), set force, or check the source/target base models are related."
    )
    with pytest.raises(NothingTransferableError, match=re.escape(expected)):
        transfer_adapter(
            layers, DictWeights(weights), DictWeights(dict.fromkeys(layers, W_t)), TransferOptions(rank=16)
        )
    with pytest.raises(NothingTransferableError, match=re.escape("the adapter has no layers to transfer")):
        transfer_adapter({}, DictWeights(weights), DictWeights(weights), TransferOptions())


def test_method_errors(make_weight, make_factors) -> None:
    W = make_weight(32, 32)
    sub = top_subspace(W, 8)
    f = make_factors(32, 32, 2)
    with pytest.raises(OptionError, match=re.escape(f"layer {KEY}: method 'lorax' needs a LoRA-X adapter")):
        _run(f, W, W, method="lorax")
    with pytest.raises(
        OptionError, match=re.escape("method 'lorax' cannot transfer a standard LoRA layer; use one of")
    ):
        transfer_lora_layer(f, sub, sub, "lorax")
    with pytest.raises(OptionError, match=re.escape("method 'best' is not one of auto, lorax")):
        choose_method(f, "best")
    with pytest.raises(ShapeMismatchError, match=re.escape("LoRA layer of shape 32×16 does not fit the subspaces")):
        transfer_lora_layer(make_factors(32, 16, 2), sub, sub, "exact")
    fx = LoraXFactors(core=torch.ones(12), shape=(32, 32))
    with pytest.raises(RankError, match=re.escape("LoRA-X core has rank 12 but the source subspace holds only 8")):
        lorax_to_lora(fx, sub)
    with pytest.raises(RankError, match=re.escape("LoRA-X core has rank 12 but the target subspace holds only 8")):
        transfer_lorax_layer(fx, top_subspace(W, 12), sub)
    other = top_subspace(make_weight(32, 40), 12)
    with pytest.raises(
        ShapeMismatchError, match=re.escape("LoRA-X transfer needs equal shapes; source (32, 32) vs target (32, 40)")
    ):
        transfer_lorax_layer(fx, top_subspace(W, 12), other)


def test_choose_method_auto_rule(make_factors) -> None:
    fx = LoraXFactors(core=torch.ones(4), shape=(8, 8))
    assert choose_method(make_factors(8, 8, 2), "auto") == "exact"
    assert choose_method(make_factors(8, 8, 2, kernel=(3, 3)), "auto", conv=True) == "copy"
    assert choose_method(make_factors(8, 8, 2), "exact", conv=True) == "exact"
    assert choose_method(fx, "auto") == "lorax"
    assert choose_method(fx, "prolora") == "prolora"


def test_lorax_adapter_with_standard_method_uses_its_factors(make_weight, helpers, tol) -> None:
    W = make_weight(96, 96)
    fx = LoraXFactors(core=torch.linspace(1, 2, R), shape=(96, 96))
    res = _run(fx, W, W, method="exact", rank=R)
    assert helpers.rel_err(_out(res), _dense_lorax(fx, W)) < tol[torch.float32]


def test_update_projected_to_zero_is_reported(make_orthogonal) -> None:
    P, Q = make_orthogonal(64), make_orthogonal(64)
    W = (P * torch.exp(-4.0 * torch.arange(64) / 64)) @ Q.T
    # The LoRA lives entirely outside the top-16 spaces, so `project` leaves nothing.
    f = LoraFactors(up=P[:, 20:24].clone(), down=Q[:, 20:24].T.clone())
    with pytest.raises(NothingTransferableError, match=re.escape(f"(1 layers): {SkipReason.PROJECTED_ZERO.text}")):
        _run(f, W, W, method="project", rank=16)
    rep = _run(f, W, W, method="exact", rank=16).report.layers[0]
    assert rep.status == "transferred" and rep.output_rank == 4


def test_auto_copies_conv_layers_behind_the_similarity_gate(
    make_weight, make_factors, make_orthogonal, helpers, tol
) -> None:
    # auto keeps a conv layer's update unchanged (the quality benchmark's finding) but, unlike
    # copy asked for by name, still refuses a conv layer whose base is unrelated.
    W = make_weight(64, 64 * 9).reshape(64, 64, 3, 3)
    W_t = (W.reshape(64, -1) + 0.01 * make_weight(64, 64 * 9)).reshape(64, 64, 3, 3)
    f = make_factors(64, 64, 4, alpha=2.0, kernel=(3, 3))
    result = _run(f, W, W_t, method="auto", rank=R)
    record = result.report.layers[0]
    assert record.method == "copy" and record.status == "transferred" and "auto: convolution" in record.reason
    assert record.phi_left is not None
    assert helpers.rel_err(_out(result), helpers.dense(f)) < tol[torch.float32]

    rotated = (make_orthogonal(64) @ W.reshape(64, -1) @ make_orthogonal(64 * 9).T).reshape(64, 64, 3, 3)
    with pytest.raises(NothingTransferableError, match="similarity below threshold"):
        _run(f, W, rotated, method="auto", rank=R)
    assert _run(f, W, rotated, method="copy", rank=R).report.layers[0].status == "transferred"


def test_report_summary_is_loud_about_dropped_layers_and_says_which_rows_it_lists() -> None:
    from lorax_core.types import LayerReport, TransferReport

    report = TransferReport(options={})
    for i in range(15):
        report.layers.append(LayerReport(key=f"l{i}", status="transferred", reason="", method="exact",
                                         phi_left=0.5 + i / 100, phi_right=0.9, chance=0.1, output_rank=4))  # fmt: skip
    report.layers.append(LayerReport(key="s", status="skipped", reason="width mismatch", method="exact"))
    lines = report.summary().splitlines()
    assert lines[0] == "LoRA-X transfer: 15 of 16 layers transferred, 1 skipped."
    assert lines[1].startswith("WARNING: 1 of 16 layers were NOT transferred; the result has lost their effect.")
    assert lines[2] == "  skipped 1: width mismatch"
    assert lines[3] == "The 12 least similar transferred layers (lowest Φ first; the other 3 are in the full report):"
    assert lines[4].startswith("  l0: exact, Φ=0.500")
    assert len(lines) == 4 + 12
