"""Procedural images: coloured shapes on a background, with class labels as the "prompt".

Every image is rendered by code from a seeded ``torch.Generator``, so the data is unlimited
and exactly reproducible. Images are float32 tensors ``(N, 3, 16, 16)`` in ``[-1, 1]`` on CPU.

Distributions (``domain``):

* ``base`` — saturated shape on a dark grey background: what ``source`` is trained on.
* ``shifted`` — a dark, muted shape on a light, tinted background: what ``finetuned`` is further
  trained on (the "Realistic Vision from SD 1.5" drift: same content, other colours). The shape
  keeps a contrast to its background close to ``base``'s (value 0.15–0.35 on 0.75–0.9): with a
  paler shape (0.35–0.55) the fine-tunes learnt the new look long before the shapes in it and
  drew their prompt's shape in only about half their samples.

Styles an adapter learns (applied on top of a domain):

* ``plain`` — no style.
* ``palette`` — a warm orange/magenta foreground on a blue background (a colour style,
  learnable by almost any layer). It keeps the domain visible: the foreground keeps the
  domain's saturation and brightness (bright and saturated on ``base``, muted on ``shifted``)
  and the blue background follows the domain's brightness (deep blue on ``base``, pale blue on
  ``shifted``), so a sample can show the style *and* its base model's look (the ``look`` metric).
* ``stripes`` — the shape is filled with horizontal stripes of period 2 px (a texture style,
  which needs spatial, i.e. convolutional, processing).
"""

from __future__ import annotations

import math

import torch

__all__ = ["CLASSES", "DOMAINS", "IMAGE_SIZE", "STYLES", "balanced_labels", "grid", "render", "sample_batch"]

IMAGE_SIZE = 16
CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
DOMAINS: tuple[str, ...] = ("base", "shifted")
STYLES: tuple[str, ...] = ("plain", "palette", "stripes")

_SUPERSAMPLE = 4  # render at 4× and average-pool: anti-aliased edges without a raster library


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Vectorised HSV → RGB; inputs ``(N,)`` in ``[0, 1]``, output ``(N, 3)`` in ``[0, 1]``."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)
    f = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return v[:, None] - v[:, None] * s[:, None] * f


def _masks(labels: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Shape masks ``(N, 1, 16, 16)`` in ``[0, 1]`` for class ``labels`` at centre (cx, cy), half-size ``size``."""
    n = labels.shape[0]
    res = IMAGE_SIZE * _SUPERSAMPLE
    coords = (torch.arange(res, dtype=torch.float32) + 0.5) / _SUPERSAMPLE
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    dx = (xx[None] - cx[:, None, None]) / size[:, None, None]
    dy = (yy[None] - cy[:, None, None]) / size[:, None, None]
    circle = dx**2 + dy**2 <= 1.0
    square = (dx.abs() <= 0.8) & (dy.abs() <= 0.8)
    triangle = (dy <= 0.8) & (dy >= -0.9) & (dx.abs() <= (dy + 0.9) / 1.7 * 0.95)
    cross = ((dx.abs() <= 0.3) & (dy.abs() <= 1.0)) | ((dy.abs() <= 0.3) & (dx.abs() <= 1.0))
    stacked = torch.stack([circle, square, triangle, cross], dim=1).float()  # (N, 4, res, res)
    mask = stacked[torch.arange(n), labels][:, None]
    return torch.nn.functional.avg_pool2d(mask, _SUPERSAMPLE)


def render(labels: torch.Tensor, domain: str, style: str, generator: torch.Generator) -> torch.Tensor:
    """Render one image per label.

    Args:
        labels: ``(N,)`` int64 class indices into :data:`CLASSES`.
        domain: one of :data:`DOMAINS`.
        style: one of :data:`STYLES`.
        generator: the CPU generator all randomness is drawn from (positions, sizes, colours).

    Returns:
        ``(N, 3, 16, 16)`` float32 in ``[-1, 1]``.
    """
    if domain not in DOMAINS or style not in STYLES:
        raise ValueError(f"unknown domain {domain!r} or style {style!r}; use one of {DOMAINS} and {STYLES}")
    n = labels.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    cx, cy, size = uniform(5.5, 10.5), uniform(5.5, 10.5), uniform(3.6, 5.4)
    mask = _masks(labels, cx, cy, size)
    # palette draws its foreground hue from the warm arc (magenta → orange) and paints the
    # background blue, at the domain's own saturation and brightness: the style changes the hues,
    # the domain keeps deciding how bright and how saturated things are
    fg_hue = (uniform(0.88, 1.1) % 1.0) if style == "palette" else uniform(0, 1)
    if domain == "base":
        fg = _hsv_to_rgb(fg_hue, uniform(0.7, 1.0), uniform(0.8, 1.0))
        if style == "palette":
            bg = _hsv_to_rgb(uniform(0.6, 0.66), uniform(0.75, 0.9), uniform(0.35, 0.5))
        else:
            bg = uniform(0.1, 0.25)[:, None].expand(n, 3)
    else:
        fg = _hsv_to_rgb(fg_hue, uniform(0.4, 0.7), uniform(0.15, 0.35))
        if style == "palette":
            bg = _hsv_to_rgb(uniform(0.58, 0.64), uniform(0.25, 0.45), uniform(0.75, 0.9))
        else:
            bg = _hsv_to_rgb(uniform(0.05, 0.2), uniform(0.15, 0.35), uniform(0.75, 0.9))
    fg_map = fg[:, :, None, None].expand(n, 3, IMAGE_SIZE, IMAGE_SIZE).clone()
    bg_map = bg[:, :, None, None].expand(n, 3, IMAGE_SIZE, IMAGE_SIZE).clone()
    if style == "stripes":
        phase = torch.randint(0, 2, (n,), generator=generator)
        rows = torch.arange(IMAGE_SIZE)
        dark = ((rows[None, :] + phase[:, None]) % 2 == 0).float()  # (N, 16): every other row
        shade = 1.0 - 0.8 * dark[:, None, :, None]
        fg_map = fg_map * shade
    image = mask * fg_map + (1 - mask) * bg_map
    return (image.clamp(0, 1) * 2 - 1).contiguous()


def sample_batch(
    batch: int, domain: str, style: str, generator: torch.Generator, num_classes: int = len(CLASSES)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``batch`` labelled images; returns ``(images (B, 3, 16, 16), labels (B,))``."""
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    return render(labels, domain, style, generator), labels


def balanced_labels(count: int) -> torch.Tensor:
    """``count`` labels cycling through every class: the fixed "prompts" of an evaluation batch."""
    return torch.arange(count) % len(CLASSES)


def grid(images: torch.Tensor, columns: int, pad: int = 1) -> torch.Tensor:
    """Tile ``(N, 3, H, W)`` images in ``[-1, 1]`` into one ``(3, H', W')`` image in ``[0, 1]``."""
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    out = torch.ones(c, rows * (h + pad) + pad, columns * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        out[:, y : y + h, x : x + w] = (images[i].clamp(-1, 1) + 1) / 2
    return out
