"""Trainable LoRA-X wrappers: zero init, factored forward = dense ΔW, only ΔΣ trains, collection."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorax_core.errors import OptionError
from lorax_core.linalg import top_subspace
from lorax_core.lorax_module import LoraXConv2d, LoraXLinear, add_lorax, collect_lorax
from lorax_core.transfer import transfer_adapter
from lorax_core.types import DictWeights, LoraXFactors, TransferOptions


def _delta(f: LoraXFactors, W: torch.Tensor) -> torch.Tensor:
    sub = top_subspace(W, f.rank)
    core = torch.diag(f.core) if f.core.ndim == 1 else f.core
    return sub.U @ core @ sub.V.T


@pytest.mark.parametrize("full_core", [False, True])
def test_linear_wrapper_matches_dense_update(rng, full_core) -> None:
    base = nn.Linear(48, 40)
    layer = LoraXLinear(base, rank=16, full_core=full_core)
    x = torch.randn(3, 5, 48, generator=rng)
    assert torch.allclose(layer(x), base(x))  # zero init: identical to the base layer
    with torch.no_grad():
        layer.core.copy_(torch.randn(layer.core.shape, generator=rng))
    dW = _delta(layer.factors(), base.weight.detach())
    assert torch.allclose(layer(x), base(x) + x @ dW.T, atol=1e-4)


@pytest.mark.parametrize("full_core", [False, True])
def test_conv_wrapper_matches_dense_update(rng, full_core) -> None:
    base = nn.Conv2d(6, 10, kernel_size=3, padding=1, stride=2)
    layer = LoraXConv2d(base, rank=8, full_core=full_core)
    x = torch.randn(2, 6, 9, 9, generator=rng)
    assert torch.allclose(layer(x), base(x))
    with torch.no_grad():
        layer.core.copy_(torch.randn(layer.core.shape, generator=rng))
    dW = _delta(layer.factors(), base.weight.detach()).reshape(base.weight.shape)
    want = F.conv2d(x, base.weight + dW, base.bias, stride=2, padding=1)
    assert torch.allclose(layer(x), want, atol=1e-4)


def test_only_the_core_trains(rng) -> None:
    base = nn.Linear(32, 32)
    layer = LoraXLinear(base, rank=8)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["core"]
    weight_before = base.weight.detach().clone()
    optimizer = torch.optim.SGD([layer.core], lr=0.1)
    x, y = torch.randn(16, 32, generator=rng), torch.randn(16, 32, generator=rng)
    for _ in range(3):
        optimizer.zero_grad()
        F.mse_loss(layer(x), y).backward()
        optimizer.step()
    assert torch.equal(base.weight, weight_before)
    assert float(layer.core.detach().abs().sum()) > 0


def test_add_and_collect_then_transfer_round_trip(rng) -> None:
    model = nn.Sequential()
    model.add_module("attn", nn.Module())
    model.attn.add_module("to_q", nn.Linear(40, 40))
    model.attn.add_module("to_k", nn.Linear(40, 40))
    model.attn.add_module("other", nn.Linear(40, 40))
    weights = {
        f"diffusion_model.attn.{n}.weight": getattr(model.attn, n).weight.detach().clone() for n in ("to_q", "to_k")
    }
    wrapped = add_lorax(model, include=("to_q", "to_k"), rank=8)
    assert wrapped == ["attn.to_q", "attn.to_k"] and isinstance(model.attn.other, nn.Linear)
    with torch.no_grad():
        model.attn.to_q.core.copy_(torch.randn(8, generator=rng))
        model.attn.to_k.core.copy_(torch.randn(8, generator=rng))
    adapter = collect_lorax(model, prefix="diffusion_model.")
    assert set(adapter) == set(weights)
    assert adapter["diffusion_model.attn.to_q.weight"].shape == (40, 40)
    # Transferring onto the very base it was trained on reproduces the trained update.
    res = transfer_adapter(adapter, DictWeights(weights), DictWeights(weights), TransferOptions(rank=8))
    for key, f in adapter.items():
        out = res.layers[key]
        assert torch.allclose(out.up2d() @ out.down2d(), _delta(f, weights[key]), atol=1e-4)


def test_module_errors() -> None:
    with pytest.raises(OptionError, match=re.escape("LoraXLinear wraps nn.Linear; got Conv2d. Use LoraXConv2d")):
        LoraXLinear(nn.Conv2d(2, 2, 1))  # type: ignore[arg-type]
    with pytest.raises(OptionError, match=re.escape("LoraXConv2d wraps nn.Conv2d; got Linear. Use LoraXLinear")):
        LoraXConv2d(nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(
        OptionError, match=re.escape("LoraXConv2d supports groups=1 and padding_mode='zeros'; got groups=2")
    ):
        LoraXConv2d(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(OptionError, match=re.escape("add_lorax: no nn.Linear/nn.Conv2d module of Sequential matches")):
        add_lorax(nn.Sequential(nn.Linear(2, 2)), include=("to_q",))
    with pytest.raises(OptionError, match=re.escape("collect_lorax: Sequential has no LoraXLinear/LoraXConv2d module")):
        collect_lorax(nn.Sequential(nn.Linear(2, 2)))
