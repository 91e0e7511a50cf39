"""The benchmark's trainable LoHa/LoKr wrappers are the layers the core reads from their file tensors.

For each wrapper (linear and 3×3 conv): the core's reader (``build_lycoris``) gives back the
wrapper's own ΔW, and the real ``lycoris-lora`` package, given the same tensors, has the same
parameter shapes and computes the same ΔW — so the benchmark's adapters are laid out as the
tool people train them with writes them.
"""

from __future__ import annotations

import logging

import pytest
import torch
from lycoris.functional import factorization
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from torch import nn

from benchmarks.quality.run import _adapter_layers, _adapter_state, _on_base
from benchmarks.quality.train import (
    LohaLayer,
    LokrLayer,
    _ProductAdapter,
    add_lycoris,
    collect_lycoris,
    kron_split,
    lycoris_layer,
)
from lorax_core.lycoris import LycorisLayer

#: linear (square, wide, tall: 32 → (4, 8), 64 → (8, 8), 256 → (16, 16)) and 1×1 / 3×3 conv (96 → (8, 12))
LAYERS: dict[str, nn.Module] = {
    "linear_square": nn.Linear(64, 64),
    "linear_tall": nn.Linear(64, 256),
    "linear_wide": nn.Linear(128, 32),
    "conv1x1": nn.Conv2d(32, 32, 1),
    "conv3x3": nn.Conv2d(96, 64, 3, padding=1),
}
WRAPPERS = {"loha": (LohaLayer, 4), "lokr": (LokrLayer, 2)}


def _trained(kind: str, layer: str, seed: int = 0) -> _ProductAdapter:
    """A wrapper whose zero-initialised factor is set to random values, as training would leave it."""
    cls, rank = WRAPPERS[kind]
    wrapper = cls(LAYERS[layer], rank, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in wrapper.parameters():
            if p.requires_grad and not p.any():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return wrapper


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("kind", list(WRAPPERS))
def test_core_reader_gives_the_wrappers_update(kind: str, layer: str) -> None:
    wrapper = _trained(kind, layer)
    read = lycoris_layer("diffusion_model.x.weight", wrapper.parts())
    assert isinstance(read, LycorisLayer) and read.kind == kind and not read.densified
    delta = wrapper.delta().detach()
    assert delta.abs().max() > 0.1  # a real update, not two zeros compared
    got = read.scale * read.up2d() @ read.down2d()
    assert got.shape == delta.shape == (LAYERS[layer].weight.shape[0], LAYERS[layer].weight[0].numel())
    torch.testing.assert_close(got, delta, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("kind", list(WRAPPERS))
def test_real_lycoris_module_has_the_same_layout_and_update(kind: str, layer: str) -> None:
    wrapper = _trained(kind, layer)
    _, rank = WRAPPERS[kind]
    logging.disable(logging.WARNING)  # LyCORIS logs its module choices
    try:
        if kind == "loha":
            module: nn.Module = LohaModule("x", LAYERS[layer], lora_dim=rank, alpha=rank)
        else:
            module = LokrModule("x", LAYERS[layer], lora_dim=rank, alpha=rank, factor=-1)
    finally:
        logging.disable(logging.NOTSET)
    own = {name: p for name, p in module.named_parameters() if not name.startswith("org")}
    parts = wrapper.parts()
    alpha = parts.pop(".alpha")
    assert {f".{name}" for name in own} == set(parts)  # LyCORIS chose the same tensors (a factored lokr_w2)
    with torch.no_grad():
        for name, p in own.items():
            assert p.shape == parts[f".{name}"].shape, name
            p.copy_(parts[f".{name}"])
    assert float(module.alpha) == float(alpha)
    # scale alpha / rank = 1, so LyCORIS's diff weight is ΔW itself
    diff, _ = module.get_diff_weight()
    torch.testing.assert_close(diff.detach().reshape(wrapper.delta().shape), wrapper.delta().detach(), atol=1e-5,
                               rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("kind", list(WRAPPERS))
def test_wrapper_forward_adds_the_update_and_starts_at_zero(kind: str) -> None:
    cls, rank = WRAPPERS[kind]
    conv = LAYERS["conv3x3"]
    x = torch.randn(2, 96, 5, 5, generator=torch.Generator().manual_seed(3))
    fresh = cls(conv, rank, torch.Generator().manual_seed(0))
    assert torch.equal(fresh.delta(), torch.zeros_like(fresh.delta()))  # one side zero: starts as the base
    torch.testing.assert_close(fresh(x), conv(x))
    wrapper = _trained(kind, "conv3x3")
    expected = nn.functional.conv2d(x, conv.weight + wrapper.delta().reshape(conv.weight.shape), conv.bias, padding=1)
    torch.testing.assert_close(wrapper(x), expected, atol=1e-4, rtol=1e-4)


def test_kron_split_is_lycoris_factorization() -> None:
    for n in range(1, 1100):
        assert kron_split(n) == factorization(n, -1), n


def test_lokr_rank_lycoris_would_store_full_is_refused() -> None:
    with pytest.raises(ValueError, match=r"LoKr dim 4 on a 64×64 layer: LyCORIS stores lokr_w2 full .* use dim < 4"):
        LokrLayer(nn.Linear(64, 64), 4, torch.Generator().manual_seed(0))


def test_lycoris_layer_names_a_damaged_layer() -> None:
    parts = _trained("loha", "linear_square").parts()
    del parts[".hada_w2_b"]
    with pytest.raises(
        ValueError, match=r"layer k\.weight: .*did not read .* incomplete LoHa layer: hada_w2_b missing"
    ):
        lycoris_layer("k.weight", parts)


def test_collect_reads_every_wrapped_layer() -> None:
    model = nn.Sequential()
    model.add_module("block", nn.Module())
    model.block.add_module("to_q", nn.Linear(32, 32))
    model.block.add_module("in_layers", nn.Sequential(nn.Identity(), nn.Identity(), nn.Conv2d(32, 64, 3, padding=1)))
    model.block.add_module("norm", nn.Linear(32, 32))  # not an adapted name: stays a plain layer
    names = add_lycoris(model, "lokr", 2, seed=0)
    assert names == ["block.to_q", "block.in_layers.2"]
    layers = collect_lycoris(model)
    assert set(layers) == {"block.to_q.weight", "block.in_layers.2.weight"}
    assert all(isinstance(f, LycorisLayer) and f.kind == "lokr" for f in layers.values())
    assert isinstance(model.block.norm, nn.Linear)


@pytest.mark.parametrize("kind", list(WRAPPERS))
def test_adapter_cache_restores_the_layers_through_the_reader(kind: str) -> None:
    shapes = {"a.to_q.weight": "linear_tall", "a.in_layers.2.weight": "conv3x3"}
    layers = {key: lycoris_layer(key, _trained(kind, layer).parts()) for key, layer in shapes.items()}
    state = _adapter_state(layers)
    assert all("::." in k for k in state)  # stored as the file's tensors, by suffix
    restored = _adapter_layers(state)
    assert restored.keys() == layers.keys()
    for key, layer in layers.items():
        back = restored[key]
        assert isinstance(back, LycorisLayer) and back.kind == kind
        assert back.parts.keys() == layer.parts.keys()
        assert all(torch.equal(back.parts[s], t) for s, t in layer.parts.items())
        assert back.alpha == layer.alpha and torch.equal(back.up, layer.up) and torch.equal(back.down, layer.down)
    on_base = _on_base(restored, nn.Module())  # type: ignore[arg-type] # reads only its state_dict
    assert all(on_base[k] is restored[k] for k in restored)  # passed through as read
