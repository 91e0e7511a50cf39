"""LyCORIS/DoRA/.diff layers (lorax_core.lycoris): exact factored reads, the write-back rule, DoRA's magnitude.

The dense references below spell out ComfyUI v0.3.75's formulas (comfy/weight_adapter/loha.py,
lokr.py, lora.py: torch.mm, torch.kron, the Tucker einsum, alpha / rank) independently of the
factored forms the pack uses; tests/formats/test_lycoris_tool.py checks the same files against
ComfyUI's own code.
"""

from __future__ import annotations

import math

import pytest
import torch

from lorax_core.formats import parse_lora
from lorax_core.lycoris import LycorisLayer, build_lycoris, dora_magnitude, energy_rank
from lorax_core.transfer import transfer_adapter
from lorax_core.types import DictWeights, LoraFactors, TransferOptions

G = torch.Generator().manual_seed(0)


def _r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G, dtype=torch.float64).to(torch.float32)


def _tucker(t: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.einsum("i j k l, j r, i p -> p r k l", t, b, a)


def _dense(layer: LoraFactors) -> torch.Tensor:
    return layer.scale * (layer.up2d().double() @ layer.down2d().double())


CASES = {
    # name: (parts, ComfyUI's ΔW flattened to (out, in·kh·kw))
    "loha": lambda: (
        p := {".hada_w1_a": _r(12, 3), ".hada_w1_b": _r(3, 10), ".hada_w2_a": _r(12, 2), ".hada_w2_b": _r(2, 10),
              ".alpha": torch.tensor(1.5)},
        (1.5 / 3) * (p[".hada_w1_a"] @ p[".hada_w1_b"]) * (p[".hada_w2_a"] @ p[".hada_w2_b"]),
    ),
    "loha_tucker": lambda: (
        p := {".hada_w1_a": _r(3, 12), ".hada_w1_b": _r(3, 5), ".hada_w2_a": _r(3, 12), ".hada_w2_b": _r(3, 5),
              ".hada_t1": _r(3, 3, 3, 3), ".hada_t2": _r(3, 3, 3, 3), ".alpha": torch.tensor(2.0)},
        (2.0 / 3) * (_tucker(p[".hada_t1"], p[".hada_w1_b"], p[".hada_w1_a"])
                     * _tucker(p[".hada_t2"], p[".hada_w2_b"], p[".hada_w2_a"])).reshape(12, -1),
    ),
    "lokr_w1_full_w2_factored": lambda: (
        p := {".lokr_w1": _r(4, 2), ".lokr_w2_a": _r(3, 2), ".lokr_w2_b": _r(2, 5), ".alpha": torch.tensor(4.0)},
        2.0 * torch.kron(p[".lokr_w1"], p[".lokr_w2_a"] @ p[".lokr_w2_b"]),
    ),
    "lokr_both_factored": lambda: (
        p := {".lokr_w1_a": _r(4, 1), ".lokr_w1_b": _r(1, 2), ".lokr_w2_a": _r(3, 2), ".lokr_w2_b": _r(2, 5),
              ".alpha": torch.tensor(1.0)},
        0.5 * torch.kron(p[".lokr_w1_a"] @ p[".lokr_w1_b"], p[".lokr_w2_a"] @ p[".lokr_w2_b"]),
    ),
    "lokr_full_full_no_alpha_scale": lambda: (
        p := {".lokr_w1": _r(2, 3), ".lokr_w2": _r(3, 4), ".alpha": torch.tensor(7.0)},
        torch.kron(p[".lokr_w1"], p[".lokr_w2"]),  # no factored block: ComfyUI's scale is 1
    ),
    "lokr_conv_full": lambda: (
        p := {".lokr_w1": _r(2, 2), ".lokr_w2": _r(3, 4, 3, 3)},
        torch.kron(p[".lokr_w1"][:, :, None, None], p[".lokr_w2"]).reshape(6, -1),
    ),
    "lokr_tucker": lambda: (
        p := {".lokr_w1": _r(2, 2), ".lokr_w2_a": _r(2, 3), ".lokr_w2_b": _r(2, 4), ".lokr_t2": _r(2, 2, 3, 3),
              ".alpha": torch.tensor(1.0)},
        0.5 * torch.kron(p[".lokr_w1"][:, :, None, None],
                         _tucker(p[".lokr_t2"], p[".lokr_w2_b"], p[".lokr_w2_a"]).contiguous()).reshape(6, -1),
    ),
    "locon_tucker": lambda: (
        p := {".lora_down.weight": _r(3, 5, 1, 1), ".lora_mid.weight": _r(3, 3, 3, 3), ".lora_up.weight": _r(7, 3, 1, 1),
              ".alpha": torch.tensor(3.0)},
        p[".lora_up.weight"].reshape(7, 3)
        @ torch.einsum("abhw,bc->achw", p[".lora_mid.weight"], p[".lora_down.weight"].reshape(3, 5)).reshape(3, -1),
    ),
    "diff": lambda: (p := {".diff": _r(6, 4, 3, 3), ".diff_b": _r(6)}, p[".diff"].reshape(6, -1)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_read_equals_comfyui_formula(name: str) -> None:
    parts, want = CASES[name]()
    layer = build_lycoris("x", parts)
    assert isinstance(layer, LoraFactors)
    got = _dense(layer)
    assert got.shape == want.shape
    assert float((got - want.double()).norm() / want.double().norm()) < 1e-5


def test_factored_ranks_are_the_structural_ones() -> None:
    assert build_lycoris("x", CASES["loha"]()[0]).rank == 6  # r1·r2
    lokr = build_lycoris("x", CASES["lokr_w1_full_w2_factored"]()[0])
    assert lokr.rank == 2 * 2 and not lokr.densified  # min(a, c)·r2
    assert build_lycoris("x", CASES["lokr_full_full_no_alpha_scale"]()[0]).densified
    assert build_lycoris("x", CASES["diff"]()[0]).densified


def test_energy_rank_keeps_the_smallest_prefix_reaching_the_energy() -> None:
    s = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)  # singular values; up = Q·√s
    up = torch.linalg.qr(_r(10, 4).double())[0] * s.sqrt()
    total = float((s**2).sum())
    assert energy_rank(up, 0.98, None) == (3, pytest.approx(float((s[:3] ** 2).sum()) / total))  # 21 / 21.25
    assert energy_rank(up, 0.99, None)[0] == 4
    assert energy_rank(up, 0.7, None)[0] == 1
    assert energy_rank(up, 0.99, 2)[0] == 2


@pytest.mark.parametrize("axis", ["out", "in"])
def test_dora_magnitude_keeps_the_relative_magnitude(axis: str) -> None:
    ws = _r(6, 4, 3, 3)
    m = _r(6, 1, 1, 1).abs() if axis == "out" else _r(1, 4, 1, 1).abs()
    assert torch.allclose(dora_magnitude(m, ws, ws), m)
    assert torch.allclose(dora_magnitude(m, ws, 2.5 * ws), 2.5 * m, rtol=1e-5)
    wt = ws + 0.1 * _r(6, 4, 3, 3)
    dims = (1, 2, 3) if axis == "out" else (0, 2, 3)
    want = (
        m.double()
        * wt.double().pow(2).sum(dims, keepdim=True).sqrt()
        / ws.double().pow(2).sum(dims, keepdim=True).sqrt()
    )
    assert torch.allclose(dora_magnitude(m, ws, wt).double(), want, rtol=1e-5)


def _weights(seed: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) for k, s in shapes.items()}


SHAPES = {
    "a.weight": (24, 20),
    "b.weight": (24, 20),
    "c.weight": (12, 4, 3, 3),
    "d.weight": (24, 20),
    "e.weight": (24, 20),
}


def _mixed() -> dict[str, LoraFactors]:
    tensors = {
        "lora_unet_a.lora_down.weight": _r(2, 20), "lora_unet_a.lora_up.weight": _r(24, 2),
        "lora_unet_b.hada_w1_a": _r(24, 2), "lora_unet_b.hada_w1_b": _r(2, 20),
        "lora_unet_b.hada_w2_a": _r(24, 2), "lora_unet_b.hada_w2_b": _r(2, 20),
        "lora_unet_c.lora_down.weight": _r(2, 4, 1, 1), "lora_unet_c.lora_mid.weight": _r(2, 2, 3, 3),
        "lora_unet_c.lora_up.weight": _r(12, 2, 1, 1),
        "lora_unet_d.lokr_w1": _r(4, 4), "lora_unet_d.lokr_w2_a": _r(6, 2), "lora_unet_d.lokr_w2_b": _r(2, 5),
        "lora_unet_e.lora_down.weight": _r(2, 20), "lora_unet_e.lora_up.weight": _r(24, 2),
        "lora_unet_e.dora_scale": _r(24, 1).abs() + 1,
    }  # fmt: skip
    lora = parse_lora(tensors)
    assert not lora.unsupported
    return {f"{name.removeprefix('lora_unet_')}.weight": layer for name, layer in lora.layers.items()}


def test_mixed_file_transfers_layer_by_layer_and_round_trips() -> None:
    layers = _mixed()
    w = DictWeights(_weights(1, SHAPES))
    result = transfer_adapter(layers, w, w, TransferOptions(rank=8))
    assert [r.status for r in result.report.layers] == ["transferred"] * 5
    written = {r.target_key: r.written_as for r in result.report.layers}
    assert written == {
        "a.weight": None,
        "b.weight": "loha",
        "c.weight": None,
        "d.weight": "lokr",
        "e.weight": "lora+dora",
    }
    for key, layer in layers.items():
        assert float((_dense(result.layers[key]) - _dense(layer)).norm() / _dense(layer).norm()) < 2e-4
    assert torch.equal(result.layers["e.weight"].dora_scale, layers["e.weight"].dora_scale)


def test_changed_lokr_is_written_as_a_lora_with_the_reported_truncation_error() -> None:
    layers = _mixed()
    source = DictWeights(_weights(1, SHAPES))
    base = _weights(1, SHAPES)
    target = DictWeights(
        {k: v + 0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(2)) for k, v in base.items()}
    )
    full = transfer_adapter(layers, source, target, TransferOptions(rank=8, lycoris_energy=1.0, force=True))
    cut = transfer_adapter(layers, source, target, TransferOptions(rank=8, force=True))
    for key in ("b.weight", "d.weight"):
        row = next(r for r in cut.report.layers if r.target_key == key)
        assert row.written_as == "lora" and not isinstance(cut.layers[key], LycorisLayer)
        exact, written = _dense(full.layers[key]), _dense(cut.layers[key])
        assert row.truncation_error <= 0.1 + 1e-9
        assert float((written - exact).norm() / exact.norm()) == pytest.approx(row.truncation_error, abs=1e-4)
    dora = cut.layers["e.weight"]
    assert isinstance(dora, LycorisLayer) and dora.dora_scale is not None
    want = dora_magnitude(layers["e.weight"].dora_scale, source.get("e.weight"), target.get("e.weight"))
    assert torch.allclose(dora.dora_scale, want)
    assert math.isfinite(sum(r.truncation_error or 0.0 for r in cut.report.layers))


def test_output_rank_caps_a_lycoris_layer_and_its_error_is_reported() -> None:
    layers = _mixed()
    w = DictWeights(_weights(1, SHAPES))
    result = transfer_adapter({"d.weight": layers["d.weight"]}, w, w, TransferOptions(rank=8, output_rank=2))
    (row,) = result.report.layers
    assert (row.written_as, row.output_rank) == ("lora", 2)
    exact = _dense(layers["d.weight"])
    error = float((_dense(result.layers["d.weight"]) - exact).norm() / exact.norm())
    assert error == pytest.approx(row.truncation_error, abs=1e-4)
    assert row.energy_kept == pytest.approx(1 - row.truncation_error**2)
