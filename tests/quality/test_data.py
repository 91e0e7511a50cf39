"""The toy world's renders keep the domain visible under every style, so ``look`` can be scored.

``look`` asks the metric classifier which base model's domain a sample shows; that only means
something if a style changes hues or texture and leaves the domain's brightness and saturation.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.quality import data


def _corners(images: torch.Tensor) -> torch.Tensor:
    """Mean ``(N, 3)`` colour in ``[0, 1]`` of the four corner pixels: background, as no shape reaches them."""
    x = (images + 1) / 2
    return x[:, :, [0, 0, -1, -1], [0, -1, 0, -1]].mean(dim=2)


def _render(domain: str, style: str, count: int = 64) -> torch.Tensor:
    return data.render(data.balanced_labels(count), domain, style, torch.Generator().manual_seed(3))


@pytest.mark.parametrize("style", data.STYLES)
def test_background_brightness_follows_the_domain(style: str) -> None:
    dark = _corners(_render("base", style)).max(dim=1).values  # HSV value
    light = _corners(_render("shifted", style)).max(dim=1).values
    assert float(dark.max()) < 0.55 < 0.7 < float(light.min()), (style, float(dark.max()), float(light.min()))


@pytest.mark.parametrize("domain", data.DOMAINS)
def test_palette_paints_a_blue_background_in_every_domain(domain: str) -> None:
    bg = _corners(_render(domain, "palette"))
    assert bool((bg[:, 2] > bg[:, 0] + 0.05).all() and (bg[:, 2] > bg[:, 1]).all()), domain
    plain = _corners(_render(domain, "plain"))
    assert not bool((plain[:, 2] > plain[:, 0] + 0.05).all()), domain  # plain backgrounds are not blue
