"""The refine node's loss curve as an ``IMAGE`` (PIL + torch, no matplotlib).

ComfyUI's ``comfy_extras.nodes_train.draw_loss_graph`` returns a PIL image without axes or
values and divides by zero on a flat curve or a single step, so the curve is drawn here: the
per-step loss (light), its running mean (dark), the min/max values on the axis, and the
held-out loss before → after in the title.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 640, 360
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 40, 34
RAW = (160, 190, 230)
MEAN = (20, 80, 170)
AXIS = (90, 90, 90)
BG = (255, 255, 255)


def _running_mean(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_chart(losses: Sequence[float], title: str) -> torch.Tensor:
    """Render the training losses as an ``IMAGE``: float32 ``(1, H, W, 3)`` in [0, 1] on the CPU."""
    img = Image.new("RGB", (WIDTH, HEIGHT), BG)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((LEFT, 10), title, fill=(0, 0, 0), font=font)
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM
    draw.line((x0, y0, x0, y1), fill=AXIS)
    draw.line((x0, y1, x1, y1), fill=AXIS)
    draw.text((x0 + (x1 - x0) // 2 - 12, y1 + 14), "step", fill=AXIS, font=font)
    if not losses:
        draw.text((x0 + 20, (y0 + y1) // 2), "no training steps", fill=AXIS, font=font)
    else:
        low, high = min(losses), max(losses)
        span = high - low or max(abs(high), 1e-12)

        def point(i: int, v: float) -> tuple[float, float]:
            x = x0 + (x1 - x0) * (i / max(1, len(losses) - 1))
            return x, y1 - (y1 - y0) * (v - low) / span

        mean = _running_mean(losses, max(1, len(losses) // 20))
        for series, colour, width in ((losses, RAW, 1), (mean, MEAN, 2)):
            points = [point(i, v) for i, v in enumerate(series)]
            if len(points) == 1:
                draw.ellipse((points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2), fill=colour)
            else:
                draw.line(points, fill=colour, width=width)
        draw.text((4, y0 - 6), f"{high:.3g}", fill=AXIS, font=font)
        draw.text((4, y1 - 6), f"{low:.3g}", fill=AXIS, font=font)
        draw.text((x0, y1 + 4), "1", fill=AXIS, font=font)
        draw.text((x1 - 24, y1 + 4), str(len(losses)), fill=AXIS, font=font)
    array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy())[None]
