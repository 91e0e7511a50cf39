"""The similarity node's picture: one bar per layer, readable at a glance (PIL + torch, no matplotlib).

Each row is a layer pair: a bar of length Φ = min(Φ_left, Φ_right) on a 0…1 axis, green when
the layer passes the threshold, red when it does not, grey when it could not be compared
(widths differ). A dark tick marks the layer's threshold τ and a light one its chance level,
so "how far above chance" is visible without reading numbers.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..lorax_core.similarity import LayerSimilarity, SimilarityTable

WIDTH = 960
LABEL_W = 430
MARGIN = 10
HEADER_H = 44
MAX_BODY_H = 1400
PASS = (46, 160, 67)
FAIL = (207, 34, 46)
NOT_COMPARED = (150, 150, 150)
BG = (255, 255, 255)
AXIS = (90, 90, 90)


def short_name(key: str) -> str:
    """A layer label: the model key without ``diffusion_model.``/``.weight``, text encoders as ``te:``."""
    name = key[: -len(".weight")] if key.endswith(".weight") else key
    if name.startswith("diffusion_model."):
        return name[len("diffusion_model.") :]
    if name.startswith("text_encoders."):
        return "te:" + name[len("text_encoders.") :].replace("transformer.text_model.encoder.", "")
    return name


def _row(draw: ImageDraw.ImageDraw, y: int, h: int, e: LayerSimilarity, font: ImageFont.ImageFont, label: bool) -> None:
    x0, x1 = LABEL_W, WIDTH - MARGIN - 60
    span = x1 - x0
    if label:
        text = short_name(e.source_key)
        draw.text((MARGIN, y + max(0, (h - 11) // 2)), text[-64:], fill=(0, 0, 0), font=font)
    if e.phi is None:
        draw.rectangle((x0, y + 1, x1, y + h - 2), fill=(235, 235, 235), outline=NOT_COMPARED)
        if label:
            draw.text((x1 + 6, y + max(0, (h - 11) // 2)), "n/a", fill=NOT_COMPARED, font=font)
        return
    colour = PASS if e.passed else FAIL
    draw.rectangle((x0, y + 1, x0 + max(1, round(e.phi * span)), y + h - 2), fill=colour)
    for value, tick in ((e.chance, (170, 170, 170)), (e.threshold, (0, 0, 0))):
        if value is not None:
            x = x0 + round(value * span)
            draw.line((x, y, x, y + h - 1), fill=tick, width=2)
    if label:
        draw.text((x1 + 6, y + max(0, (h - 11) // 2)), f"{e.phi:.2f}", fill=colour, font=font)


def similarity_chart(table: SimilarityTable) -> torch.Tensor:
    """Render ``table`` as an ``IMAGE``: float32 ``(1, H, W, 3)`` in [0, 1] on CPU.

    Up to ~100 layers get a labelled row each; longer tables get thinner unlabelled rows
    (the colours still show where the failing layers are).
    """
    entries = table.entries
    n = max(1, len(entries))
    row_h = 14 if n * 14 <= MAX_BODY_H else max(2, MAX_BODY_H // n)
    labels = row_h >= 12
    height = HEADER_H + n * row_h + 2 * MARGIN + 14
    img = Image.new("RGB", (WIDTH, height), BG)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    passed = sum(e.passed for e in entries)
    draw.text((MARGIN, MARGIN), f"LoRA-X subspace similarity: {passed} of {len(entries)} layers pass", fill=(0, 0, 0), font=font)
    draw.text(
        (MARGIN, MARGIN + 16),
        "bar = phi = min(left, right) overlap, green pass / red fail / grey not comparable; black tick = threshold, grey = chance",
        fill=AXIS, font=font,
    )
    x0, x1 = LABEL_W, WIDTH - MARGIN - 60
    for i, e in enumerate(entries):
        _row(draw, HEADER_H + i * row_h, row_h, e, font, labels)
    axis_y = HEADER_H + n * row_h + 2
    draw.line((x0, axis_y, x1, axis_y), fill=AXIS)
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = x0 + round(v * (x1 - x0))
        draw.line((x, axis_y, x, axis_y + 3), fill=AXIS)
        draw.text((x - 8, axis_y + 4), f"{v:g}", fill=AXIS, font=font)
    array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy())[None]
