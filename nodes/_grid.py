"""The comparison grid of Compare LoRA Transfer: labelled rows of images in one ``IMAGE`` (PIL + torch).

Self-contained on purpose (no import from the pack, no ComfyUI): scripts/toy_compare_grid.py loads
this file alone to draw the same grid from the quality benchmark's toy world.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

MARGIN = 8
GAP = 4
LINE_H = 12
TITLE_LINES = 2
TITLE_H = TITLE_LINES * LINE_H + 6  # the title wraps onto at most two lines (a fixed height: a stable layout)
LABEL_MIN_W = 150
BG = (255, 255, 255)
INK = (0, 0, 0)
MUTED = (110, 110, 110)
MISSING = (225, 225, 225)


def _wrap(text: str, width: int, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont) -> list[str]:
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}".strip()
            if line and draw.textlength(candidate, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = (image.detach().to("cpu", torch.float32).clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(array)


def image_grid(rows: Sequence[tuple[str, torch.Tensor | str]], title: str = "", cell: int | None = None) -> torch.Tensor:
    """Draw ``rows`` as one labelled grid: float32 ``(1, H, W, 3)`` in [0, 1] on the CPU (ComfyUI's ``IMAGE``).

    Args:
        rows: ``(label, images)`` per row, top to bottom. ``images`` is ``(B, h, w, 3)`` in [0, 1]
            (any device and float dtype): one column per batch entry. A string instead of images
            draws a grey row with that text (a row that could not be made, and why).
        title: text above the grid (the shared settings, say), wrapped onto at most
            :data:`TITLE_LINES` lines (the rest is cut with "…").
        cell: the side of a grid cell in pixels; default: the first row's image size, scaled up
            (nearest neighbour) to at least 96 px so tiny images stay visible.

    Raises:
        ValueError: no row has images, or two rows' images differ in size.
    """
    shaped = [images for _, images in rows if isinstance(images, torch.Tensor)]
    if not shaped:
        raise ValueError("image_grid needs at least one row of images")
    h, w = int(shaped[0].shape[1]), int(shaped[0].shape[2])
    if any((int(x.shape[1]), int(x.shape[2])) != (h, w) for x in shaped):
        raise ValueError(f"every row's images must be {h}×{w}: {[tuple(x.shape) for x in shaped]}")
    columns = max(int(x.shape[0]) for x in shaped)
    scale = max(1, -(-96 // max(h, w))) if cell is None else max(1, cell // max(h, w))
    ch, cw = h * scale, w * scale
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(LABEL_MIN_W, min(260, int(max(probe.textlength(label, font=font) for label, _ in rows)) + 2 * GAP))
    top = MARGIN + (TITLE_H if title else 0)
    width = MARGIN + label_w + columns * (cw + GAP) - GAP + MARGIN
    height = top + len(rows) * (ch + GAP) - GAP + MARGIN
    canvas = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(canvas)
    if title:
        lines = _wrap(title, width - 2 * MARGIN, draw, font)
        if len(lines) > TITLE_LINES:
            lines = [*lines[: TITLE_LINES - 1], lines[TITLE_LINES - 1] + " …"]
        for i, line in enumerate(lines):
            draw.text((MARGIN, MARGIN + i * LINE_H), line, fill=MUTED, font=font)
    for r, (label, images) in enumerate(rows):
        y = top + r * (ch + GAP)
        lines = _wrap(label, label_w - GAP, draw, font)
        y_text = y + max(0, (ch - LINE_H * len(lines)) // 2)
        for i, line in enumerate(lines):
            draw.text((MARGIN, y_text + i * LINE_H), line, fill=INK, font=font)
        x0 = MARGIN + label_w
        if isinstance(images, str):
            draw.rectangle((x0, y, width - MARGIN - 1, y + ch - 1), fill=MISSING)
            for i, line in enumerate(_wrap(images, width - x0 - MARGIN - 2 * GAP, draw, font)):
                draw.text((x0 + GAP, y + GAP + i * LINE_H), line, fill=MUTED, font=font)
            continue
        for c in range(int(images.shape[0])):
            tile = _to_pil(images[c])
            if scale > 1:
                tile = tile.resize((cw, ch), Image.Resampling.NEAREST)
            canvas.paste(tile, (x0 + c * (cw + GAP), y))
    array = np.asarray(canvas, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy())[None]
