"""Helpers for the format tests: dense ΔW of factors and synthetic layers (imported by test modules)."""

from __future__ import annotations

from pathlib import Path

import torch

from lorax_core.types import AdapterLayer, LoraFactors

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def delta(layer: AdapterLayer) -> torch.Tensor:
    """Dense ΔW = scale · up @ down of a (tiny) test layer, float64, flattened to (out, in·kh·kw)."""
    assert isinstance(layer, LoraFactors)
    return layer.scale * (layer.up2d().double() @ layer.down2d().double())


def make_layer(
    kind: str, alpha: float | None, *, rank: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32
) -> LoraFactors:
    """A random layer: ``linear`` (48×40), ``conv1`` (1×1, 48×40) or ``conv3`` (3×3, 48×(8·3·3))."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "linear":
        down, up = torch.randn(rank, 40, generator=gen), torch.randn(48, rank, generator=gen)
    elif kind == "conv1":
        down, up = torch.randn(rank, 40, 1, 1, generator=gen), torch.randn(48, rank, 1, 1, generator=gen)
    else:
        down, up = torch.randn(rank, 8, 3, 3, generator=gen), torch.randn(48, rank, 1, 1, generator=gen)
    return LoraFactors(up=up.to(dtype), down=down.to(dtype), alpha=alpha)
