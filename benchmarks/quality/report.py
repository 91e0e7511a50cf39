"""Sample grids (PNG) and the generated tables of ``QUALITY.md``.

``QUALITY.md`` keeps hand-written text (the reading of the results) outside the markers
``<!-- generated:start -->`` / ``<!-- generated:end -->``; only the part between them is
rewritten, so re-running the benchmark refreshes the numbers without losing the analysis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from . import data

__all__ = ["render_tables", "write_grids", "write_markdown"]

START, END = "<!-- generated:start -->", "<!-- generated:end -->"
_COLUMNS = 8  # first seed's samples: two per class
_ZOOM = 2
_LABEL_W = 130


def write_grids(out: Path, grids: Mapping[str, Mapping[str, torch.Tensor]]) -> list[Path]:
    """One PNG per target: a labelled row of the first seed's samples per method (and style)."""
    paths = []
    for target, rows in grids.items():
        cell = (data.IMAGE_SIZE + 1) * _ZOOM
        width = _LABEL_W + _COLUMNS * cell
        canvas = Image.new("RGB", (width, len(rows) * cell + 2), "white")
        draw = ImageDraw.Draw(canvas)
        for i, (label, images) in enumerate(rows.items()):
            tile = data.grid(images[:_COLUMNS], _COLUMNS, pad=1)
            arr = (tile.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            img = Image.fromarray(arr).resize((arr.shape[1] * _ZOOM, arr.shape[0] * _ZOOM), Image.NEAREST)
            canvas.paste(img, (_LABEL_W, i * cell))
            draw.text((4, i * cell + cell // 2 - 5), label, fill="black")
        path = out / f"quality_{target}.png"
        canvas.save(path, optimize=True)
        paths.append(path)
    return paths


def _fmt(mean: Any, std: Any, digits: int = 2) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def _ratio(value: Any, ref: Any) -> str:
    if value is None or ref is None or ref <= 0 or math.isnan(ref):
        return "–"
    return f"{value / ref:.2f}×"


def render_tables(doc: Mapping[str, Any]) -> str:
    """Markdown tables of a ``quality.json`` document."""
    lines: list[str] = []
    cfg = doc["config"]
    lines.append(
        f"Run: {doc['seconds'] / 60:.1f} min wall ({', '.join(f'{k} {v:.0f} s' for k, v in doc['timings'].items())}); "
        f"{cfg['seeds']} sampling seeds × {cfg['per_seed']} images; transfer R = {cfg['transfer_rank']}, "
        f"LoRA-X R = {cfg['lorax_rank']}, threshold c = {cfg['threshold']}; quick = {cfg['quick']}."
    )
    lines.append("")
    domains = doc.get("domains", {})
    lines.extend(_refine_summary(doc))
    lines.append("### Adapters on their own base (`source`)")
    lines.append("")
    lines.append(f"`look` = probability of the `{domains.get('source', 'base')}` domain (`source`'s own look).")
    lines.append("")
    lines.append("| adapter | style (none) | style (adapter) | content (adapter) | look (none) | look (adapter) |")
    lines.append("|---|---|---|---|---|---|")
    for name, ref in doc["source_reference"].items():
        lines.append(
            f"| {name} | {_fmt(ref['none']['style'], ref['none']['style_std'])} | "
            f"{_fmt(ref['adapter']['style'], ref['adapter']['style_std'])} | "
            f"{_fmt(ref['adapter']['content'], ref['adapter']['content_std'])} | "
            f"{_fmt(ref['none']['look'], ref['none']['look_std'])} | "
            f"{_fmt(ref['adapter']['look'], ref['adapter']['look_std'])} |"
        )
    for target, body in doc["targets"].items():
        lines.append("")
        lines.append(f"### Target `{target}`")
        lines.append("")
        # the bare target's own rate is the yardstick: a mixed-domain target (finetuned) is below 1 itself
        bare = next(iter(body["adapters"].values()))["methods"]["none"]["look"]
        lines.append(
            f"`look` = probability of the `{body['domain']}` domain, the target's own look "
            f"(bare target: {_fmt(bare, None)})."
        )
        lines.append("")
        lines.append("| adapter | method | style | ×retrained | ×copy | content | look | distance (MMD²) | layers |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for name, entry in body["adapters"].items():
            methods = entry["methods"]
            ref_style = methods.get("retrained", {}).get("style")
            copy_style = methods.get("copy", {}).get("style")
            for method, m in methods.items():
                layers = "refused" if m.get("refused") else str(m.get("layers_transferred", ""))
                lines.append(
                    f"| {name} | {method} | {_fmt(m['style'], m['style_std'])} | {_ratio(m['style'], ref_style)} | "
                    f"{_ratio(m['style'], copy_style)} | {_fmt(m['content'], m['content_std'])} | "
                    f"{_fmt(m['look'], m['look_std'])} | {_fmt(m['distance'], m['distance_std'], 3)} | {layers} |"
                )
        sim = doc["similarity"].get(target)
        if sim and sim.get("families"):
            lines.append("")
            lines.append(f"Per-family similarity on `{target}` (first LoRA adapter; Φ normalised: 0 = chance, "
                         "1 = identical; norm ratio = ‖ΔW_t‖/‖ΔW_s‖):")  # fmt: skip
            lines.append("")
            methods = [k.removeprefix("norm_ratio_") for k in next(iter(sim["families"].values())) if
                       k.startswith("norm_ratio_")]  # fmt: skip
            lines.append("| family | layers | transferred | Φ̂ mean | Φ̂ min | " +
                         " | ".join(f"norm {m}" for m in methods) + " |")  # fmt: skip
            lines.append("|---" * (5 + len(methods)) + "|")
            for fam, s in sim["families"].items():
                cells = [_fmt(s[f"norm_ratio_{m}"], None) for m in methods]
                lines.append(
                    f"| {fam} | {s['layers']} | {s['transferred']} | {_fmt(s['normalised_phi_mean'], None)} | "
                    f"{_fmt(s['normalised_phi_min'], None)} | " + " | ".join(cells) + " |"
                )
    return "\n".join(lines)


def _refine_summary(doc: Mapping[str, Any]) -> list[str]:
    """The headline table: training-free vs data-free refinement vs retrained, first LoRA adapter per target.

    ``cost`` is what a refinement took on this CPU: probe building (generations + teacher
    passes, shared by the runs of a cell) + that run's optimisation.
    """
    rows: list[str] = []
    for target, body in doc["targets"].items():
        for name, entry in body["adapters"].items():
            methods = entry["methods"]
            refined = [m for m in methods if m.startswith("refine:")]
            if not refined:
                continue
            ref = methods.get("retrained", {}).get("style")
            copy = methods.get("copy", {}).get("style")
            for method in ("none", "copy", "auto", *refined, "retrained"):
                m = methods.get(method)
                if m is None:
                    continue
                cost = (f"{m['probe_seconds'] + m['seconds']:.0f} s ({m['steps']} steps)"
                        if "seconds" in m and "probe_seconds" in m else "")  # fmt: skip
                delta = "–" if copy is None else f"{m['style'] - copy:+.2f}"
                rows.append(
                    f"| {target} | {name} | {method} | {_fmt(m['style'], m['style_std'])} | {_ratio(m['style'], ref)} | "
                    f"{delta} | {_fmt(m['content'], m['content_std'])} | {_fmt(m['look'], m['look_std'])} | {cost} |"
                )
    if not rows:
        return []
    return [
        "### Summary: training-free transfer, data-free refinement, retraining",
        "",
        "First LoRA adapter on every target that has a transfer to start from. `refine:<objective>@<steps>` "
        "starts from `auto`'s result and uses no training image (lorax_core.refine: probes are the models' own "
        "generations, re-noised). Style × retrained and style − copy (absolute); `look` as in the per-target tables.",
        "",
        "| target | adapter | method | style | ×retrained | −copy | content | look | cost (this CPU) |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def write_markdown(path: Path, doc: Mapping[str, Any], preamble: str) -> None:
    """Replace the generated section of ``path`` (create the file with ``preamble`` if missing)."""
    generated = f"{START}\n{render_tables(doc)}\n{END}"
    text = path.read_text() if path.exists() else f"{preamble}\n\n{START}\n{END}\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        text = head + generated + tail
    else:
        text = text.rstrip("\n") + "\n\n" + generated + "\n"
    path.write_text(text)
