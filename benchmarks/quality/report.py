"""Sample grids (PNG) and the generated tables of ``QUALITY.md``.

``QUALITY.md`` keeps hand-written text (the reading of the results) outside the markers
``<!-- generated:start -->`` / ``<!-- generated:end -->``; only the part between them is
rewritten, so re-running the benchmark refreshes the numbers without losing the analysis.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from . import data
from .train import LYCORIS_KINDS

__all__ = ["render_tables", "seed_run", "write_grids", "write_markdown"]

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


Z95 = 1.96  # a ±95 % interval is ±1.96 standard errors (normal approximation of a mean over ≥ 64 images)


def _fmt(mean: Any, se: Any, digits: int = 2) -> str:
    """``mean ± half-width of its 95 % interval`` (just the mean without a standard error)."""
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {Z95 * se:.{digits}f}" if se is not None else f"{mean:.{digits}f}"


def _ratio_se(value: float, value_se: float, ref: float, ref_se: float) -> float:
    """Standard error of ``value / ref`` (delta method, independent estimates)."""
    return math.sqrt((value_se / ref) ** 2 + (value * ref_se / ref**2) ** 2)


def _ratio(m: Mapping[str, Any] | None, ref: Mapping[str, Any] | None, key: str = "style") -> str:
    """``m[key] / ref[key]`` with its 95 % interval, e.g. ``1.05× ± 0.06``."""
    if m is None or ref is None or m.get(key) is None or ref.get(key) is None or ref[key] <= 0:
        return "–"
    r = m[key] / ref[key]
    se = _ratio_se(m[key], m[f"{key}_se"], ref[key], ref[f"{key}_se"])
    return f"{r:.2f}× ± {Z95 * se:.2f}"


def _versus(m: Mapping[str, Any], ref: Mapping[str, Any] | None, key: str) -> str:
    """``▲``/``▼`` when the 95 % intervals of ``m[key]`` and ``ref[key]`` do not overlap, else ``=``."""
    if ref is None or m.get(key) is None or ref.get(key) is None:
        return ""
    lo, hi = m[key] - Z95 * m[f"{key}_se"], m[key] + Z95 * m[f"{key}_se"]
    ref_lo, ref_hi = ref[key] - Z95 * ref[f"{key}_se"], ref[key] + Z95 * ref[f"{key}_se"]
    return "▲" if lo > ref_hi else "▼" if hi < ref_lo else "="


def _scored(m: Mapping[str, Any], method: str, copy: Mapping[str, Any] | None, key: str) -> str:
    """A score with its interval and, for a method other than ``copy``/``none``, ▲/▼/= against copy."""
    text = _fmt(m[key], m[f"{key}_se"])
    return text if method in ("copy", "none") else f"{text} {_versus(m, copy, key)}".rstrip()


def render_tables(doc: Mapping[str, Any]) -> str:
    """Markdown tables of a ``quality.json`` document: the instrument, the targets, the summary, every cell."""
    lines: list[str] = []
    cfg = doc["config"]
    n = cfg["seeds"] * cfg["per_seed"]
    lines.append(
        f"Run: {doc['seconds'] / 60:.1f} min wall ({', '.join(f'{k} {v:.0f} s' for k, v in doc['timings'].items())}"
        f"{'; with worker processes the classifier trains alongside the base models' if cfg.get('jobs', 1) > 1 else ''}); "
        f"{n} evaluation images per method ({cfg['seeds']} noise seeds × {cfg['per_seed']}); transfer R = "
        f"{cfg['transfer_rank']}, LoRA-X R = {cfg['lorax_rank']}, threshold c = {cfg['threshold']}; "
        f"quick = {cfg['quick']}. Every ± is a 95 % interval (1.96 standard errors of the mean over the images)."
    )
    if not doc.get("complete", True):
        lines.append(f"**Partial run**: targets still pending when this was written: {', '.join(doc['pending'])}.")
    lines.append("")
    lines.extend(_instrument(doc))
    lines.extend(_targets(doc))
    lines.extend(_style_by_look(doc))
    lines.extend(_refine_summary(doc))
    lines.extend(_lycoris_summary(doc))
    domains = doc.get("domains", {})
    lines.append("### Adapters on their own base (`source`)")
    lines.append("")
    lines.append(f"`look` = probability of the `{domains.get('source', 'base')}` domain (`source`'s own look).")
    lines.append("")
    lines.append("| adapter | style (none) | style (adapter) | content (none) | content (adapter) | look (adapter) |")
    lines.append("|---|---|---|---|---|---|")
    for name, ref in doc["source_reference"].items():
        none, own = ref["none"], ref["adapter"]
        lines.append(
            f"| {name} | {_fmt(none['style'], none['style_se'])} | {_fmt(own['style'], own['style_se'])} | "
            f"{_fmt(none['content'], none['content_se'])} | {_fmt(own['content'], own['content_se'])} | "
            f"{_fmt(own['look'], own['look_se'])} |"
        )
    for target, body in doc["targets"].items():
        lines.append("")
        lines.append(f"### Target `{target}`")
        lines.append("")
        # the bare target's own rate is the yardstick: a mixed-domain target (finetuned) is below 1 itself
        bare = next(iter(body["adapters"].values()))["methods"]["none"]
        lines.append(
            f"`look` = probability of the `{body['domain']}` domain, the target's own look "
            f"(bare target: {_fmt(bare['look'], bare['look_se'])}). ▲/▼/= after a score: above / below / not "
            "separable from `copy`'s (95 % intervals)."
        )
        lines.append("")
        lines.append("| adapter | method | style | ×retrained | content | look | distance (MMD²) | layers |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for name, entry in body["adapters"].items():
            methods = entry["methods"]
            ref, copy = methods.get("retrained"), methods.get("copy")
            for method, m in methods.items():
                layers = "refused" if m.get("refused") else str(m.get("layers_transferred", ""))
                lines.append(
                    f"| {name} | {method} | {_scored(m, method, copy, 'style')} | {_ratio(m, ref)} | "
                    f"{_scored(m, method, copy, 'content')} | {_scored(m, method, copy, 'look')} | "
                    f"{_fmt(m['distance'], m['distance_se'], 3)} | {layers} |"
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


def _cells(doc: Mapping[str, Any]) -> list[tuple[str, str, Mapping[str, Any]]]:
    """``(target, adapter, methods)`` of every cell."""
    return [(t, a, e["methods"]) for t, body in doc["targets"].items() for a, e in body["adapters"].items()]


def _instrument(doc: Mapping[str, Any]) -> list[str]:
    """How far the metric can be trusted: classifier accuracy, bare models' content, the cells' standard errors."""
    acc = doc["classifier_clean_accuracy"]
    combos = sorted({k.rsplit("/", 1)[0] for k in acc})
    lines = ["### The instrument", "",
             "Metric classifier on fresh clean renders (accuracy per domain/style; content = shape class):", "",
             "| domain/style | content | style | domain |", "|---|---|---|---|"]  # fmt: skip
    for c in combos:
        lines.append(f"| {c} | {acc[c + '/content']:.3f} | {acc[c + '/style']:.3f} | {acc[c + '/domain']:.3f} |")
    lines.append(f"| **minimum** | {min(v for k, v in acc.items() if k.endswith('/content')):.3f} | "
                 f"{min(v for k, v in acc.items() if k.endswith('/style')):.3f} | "
                 f"{min(v for k, v in acc.items() if k.endswith('/domain')):.3f} |")  # fmt: skip
    lines += ["", "Bare base models (no adapter): does each draw its prompt's shape? (content = class accuracy "
              f"of its samples by that classifier; target ≥ {BARE_CONTENT:g} for `source` and every related "
              "target, `unrelated` is the negative control)", "",
              f"| model | content | look | content ≥ {BARE_CONTENT:g}? |", "|---|---|---|---|"]  # fmt: skip
    bare = [("source", next(iter(doc["source_reference"].values()))["none"])]
    bare += [(t, next(iter(body["adapters"].values()))["methods"]["none"]) for t, body in doc["targets"].items()]
    for model, none in bare:
        verdict = "— (control)" if model == "unrelated" else _check(
            none["content"] >= BARE_CONTENT, f"{none['content'] - BARE_CONTENT:+.2f}")  # fmt: skip
        lines.append(f"| {model} | {_fmt(none['content'], none['content_se'])} | "
                     f"{_fmt(none['look'], none['look_se'])} | {verdict} |")  # fmt: skip
    ses = {k: [m[f"{k}_se"] for _, _, ms in _cells(doc) for m in ms.values() if m.get(f"{k}_se") is not None]
           for k in ("style", "content", "look")}  # fmt: skip
    over = {k: sum(v > 0.02 for v in vals) for k, vals in ses.items()}
    lines += ["", "Standard error of a cell's mean (every method of every cell): " + "; ".join(
        f"{k} max {max(v):.3f}, median {sorted(v)[len(v) // 2]:.3f}, {over[k]} of {len(v)} above 0.02"
        for k, v in ses.items() if v) + ".", ""]  # fmt: skip
    return lines


#: Class accuracy every bare related base model must reach for the content axis to mean anything.
BARE_CONTENT = 0.9

#: The issue's targets for refinement at the defaults: minimum style × retrained, and whether
#: content and look must not fall below copy's (look with a tolerance).
TARGET_RULES: dict[str, tuple[float, float]] = {
    # target: (style × retrained at least, look tolerance below copy)
    "finetuned": (1.0, 0.05),
    "heavy": (1.0, 0.05),
    "reparam": (0.9, 0.0),
    "shallow": (0.9, 0.0),
}


def _check(ok: bool, shortfall: str) -> str:
    return "met" if ok else f"missed ({shortfall})"


def _short(gap: float) -> str:
    """A shortfall to two decimals, or three when two would print it as 0.00."""
    return f"{gap:+.3f}" if abs(gap) < 0.005 else f"{gap:+.2f}"


def _targets(doc: Mapping[str, Any]) -> list[str]:
    """Refinement at the defaults against its targets, cell by cell, read with the 95 % intervals.

    Style: the ratio's point estimate ≥ the minimum; with several refinement seeds
    (:func:`_default_runs`), the mean of their ratios. Content: not below copy's (the refined
    interval's upper end reaches copy's mean), on every seed. Look: ≥ copy's − tolerance,
    likewise. A missed
    content target says when the retrained adapter is below copy's content too: there the style
    itself costs the classifier its shapes (stripes over a shape), so reaching the retrained
    style and copy's content at once is not possible.
    """
    rows = []
    for target, name, methods in _cells(doc):
        runs, copy, ref = _default_runs(methods), methods.get("copy"), methods.get("retrained")
        if not runs or copy is None or ref is None or target not in TARGET_RULES:
            continue
        need, tol = TARGET_RULES[target]
        ratios = [m["style"] / ref["style"] if ref["style"] > 0 else float("nan") for m in runs]
        ratio = statistics.fmean(ratios)
        style_ok = ratio >= need
        # content and look: judged on every seed, shown for the seed that scored lowest
        m_content = min(runs, key=lambda m: m["content"] + Z95 * m["content_se"])
        m_look = min(runs, key=lambda m: m["look"] + Z95 * m["look_se"])
        content_ok = m_content["content"] + Z95 * m_content["content_se"] >= copy["content"]
        look_ok = m_look["look"] + Z95 * m_look["look_se"] >= copy["look"] - tol
        d_content, d_look = m_content["content"] - copy["content"], m_look["look"] - copy["look"]
        content_miss = _short(d_content)
        if ref["content"] + Z95 * ref["content_se"] < copy["content"]:
            content_miss += f"; retrained too, {ref['content']:.2f}"
        style = (_ratio(runs[0], ref) if len(runs) == 1 else
                 f"{ratio:.2f}× (seeds {' / '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip
        rows.append(
            f"| {target} | {name} | {style}: {_check(style_ok, f'{_short(ratio - need)} vs {need:.1f}×')} | "
            f"{_fmt(m_content['content'], m_content['content_se'])} vs {_fmt(copy['content'], copy['content_se'])}: "
            f"{_check(content_ok, content_miss)} | "
            f"{_fmt(m_look['look'], m_look['look_se'])} vs {_fmt(copy['look'], copy['look_se'])}: "
            f"{_check(look_ok, _short(d_look))} |"
        )
    if not rows:
        return []
    return [
        "### Targets: refinement at the node's defaults (`refine:default`)",
        "",
        "finetuned/heavy: style ≥ 1.0× retrained, content not below copy's, look ≥ copy's − 0.05; reparam/shallow: "
        "style ≥ 0.9× retrained, content and look not below copy's. \"Not below\" = the refined 95 % interval "
        "reaches copy's mean. \"retrained too\": the retrained adapter's content is below copy's as well (the style "
        "hides the shape from the classifier), so no method reaches both that style and copy's content. Where the "
        "refinement ran with several seeds (`refine:default` is seed 0, `refine:default@seed<N>` the others), the "
        "style is the mean of the seeds' ratios (each seed listed), and content and look must hold on every seed "
        "(shown: the seed with the lowest interval).",
        "",
        "| target | adapter | style × retrained | content vs copy | look vs copy |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


_SEED_MARK = "@seed"


def seed_run(name: str, seed: int) -> str:
    """The row name of run ``name`` with ``RefineOptions.seed`` = ``seed``: ``default`` → ``default@seed<N>``.

    The benchmark names its seed rows with this and :func:`_default_runs` reads them back.
    """
    return f"{name}{_SEED_MARK}{seed}"


def _default_names(methods: Mapping[str, Any]) -> list[str]:
    """``refine:default`` (seed 0) then its runs with further seeds (``refine:default@seed<N>``), those scored."""
    prefix = f"refine:default{_SEED_MARK}"
    seeds = sorted(int(m.removeprefix(prefix)) for m in methods if m.startswith(prefix))
    return [n for n in ("refine:default", *(seed_run("refine:default", seed) for seed in seeds)) if n in methods]


def _default_runs(methods: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The scores of :func:`_default_names`' runs."""
    return [methods[n] for n in _default_names(methods)]


#: A target whose bare model reads as its own domain in this share of its samples draws both looks.
MIXED_LOOK: tuple[float, float] = (0.2, 0.8)


def _style_by_look(doc: Mapping[str, Any]) -> list[str]:
    """Style split by look on the refined cells of targets whose bare model draws both domains.

    ``own look`` = the samples the classifier reads as the target's own domain (look > 0.5).
    On such a target the style × retrained mixes two things: how strong the style is in the
    samples that keep the target's look, and how many samples a method turns to the other look.
    """
    rows = []
    cfg = doc.get("config", {})
    images = cfg["seeds"] * cfg["per_seed"] if "seeds" in cfg else None
    for target, name, methods in _cells(doc):
        none = methods.get("none")
        names = _default_names(methods)
        if (target not in TARGET_RULES or none is None or not names or "own_look_share" not in none
                or not MIXED_LOOK[0] <= none["look"] <= MIXED_LOOK[1]):  # fmt: skip
            continue
        for method in ("none", "copy", *names, "retrained"):
            m = methods.get(method)
            if m is None:
                continue
            split = [_fmt(m[k], m[f"{k}_se"]) if m[k] is not None else "—" for k in ("style_own_look", "style_other_look")]
            share = f"{m['own_look_share']:.2f}" + (f" ({round(m['own_look_share'] * images)})" if images else "")
            rows.append(f"| {target} | {name} | {method} | {share} | {split[0]} | {split[1]} | "
                        f"{_fmt(m['style'], m['style_se'])} |")  # fmt: skip
    if not rows:
        return []
    return [
        "### Style by look, where the bare target draws both looks",
        "",
        f"Targets whose bare model reads as its own domain in {MIXED_LOOK[0]:g}–{MIXED_LOOK[1]:g} of its samples. "
        "`own look` = the samples the classifier reads as the target's own domain (look > 0.5); the style is "
        "the mean style probability of those samples and of the others (— where there are none). A method "
        "reaches the retrained adapter's style by carrying the style into the target's own look, or by turning "
        "samples to the other look (which the look target counts against it).",
        "",
        "| target | adapter | method | own look share (images) | style, own look | style, other look | style |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _refine_summary(doc: Mapping[str, Any]) -> list[str]:
    """The headline table: training-free vs data-free refinement vs retrained, on every refined cell.

    ``cost`` is what a refinement took on this CPU: the generations (shared by the runs of a
    cell) + that run's probes, teacher passes and optimisation.
    """
    rows: list[str] = []
    for target, name, methods in _cells(doc):
        refined = [m for m in methods if m.startswith("refine:")]
        if not refined:
            continue
        ref, copy = methods.get("retrained"), methods.get("copy")
        for method in ("none", "copy", "auto", *refined, "retrained"):
            m = methods.get(method)
            if m is None:
                continue
            cost = (f"{m['generation_seconds'] + m['seconds']:.0f} s ({m['steps']} steps)"
                    if "seconds" in m and "generation_seconds" in m else "")  # fmt: skip
            if m.get("kept") == "start":  # the held-out check gave back the transfer unchanged
                cost += ", kept the transfer"
            rows.append(
                f"| {target} | {name} | {method} | {_scored(m, method, copy, 'style')} | {_ratio(m, ref)} | "
                f"{_scored(m, method, copy, 'content')} | {_scored(m, method, copy, 'look')} | {cost} |"
            )
    if not rows:
        return []
    return [
        "### Summary: training-free transfer, data-free refinement, retraining",
        "",
        "`refine:default` is the Refine node at its defaults; `refine:<variant>` a comparison (see the config in "
        "quality.json). Every refinement starts from `auto`'s result and uses no training image. ▲/▼/= after a "
        "score: above / below / not separable from `copy`'s (95 % intervals). \"kept the transfer\": the held-out "
        "check gave the starting LoRA back (no gain, or the LoRA's effect moved away from the teacher's).",
        "",
        "| target | adapter | method | style | ×retrained | content | look | cost (this CPU) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _lycoris_summary(doc: Mapping[str, Any]) -> list[str]:
    """LyCORIS adapters: ``auto`` against ``copy`` per target × style × kind, next to the LoRAs' verdict there.

    The issue's target: a LoHa/LoKr ``auto`` transfer is at least ``copy`` (its 95 % style interval
    not below copy's, ``▲`` or ``=``) on every target × style where every LoRA adapter's ``auto`` is.
    """
    rows: list[str] = []
    for target, body in doc["targets"].items():
        entries = body["adapters"].values()
        for style in dict.fromkeys(e["style"] for e in entries):
            marks = {e_name.split("/", 1)[1]: _versus(e["methods"]["auto"], e["methods"].get("copy"), "style")
                     for e_name, e in body["adapters"].items()
                     if e["style"] == style and "auto" in e["methods"]}  # fmt: skip
            kinds = {e_name.split("/", 1)[1]: e["kind"] for e_name, e in body["adapters"].items()}
            loras = {a: marks[a] for a in marks if kinds[a] == "lora"}
            loras_ok = bool(loras) and all(mark in ("▲", "=") for mark in loras.values())
            for adapter, mark in marks.items():
                if kinds[adapter] not in LYCORIS_KINDS:
                    continue
                methods = body["adapters"][f"{style}/{adapter}"]["methods"]
                auto, copy = methods["auto"], methods.get("copy")
                ok = mark in ("▲", "=")
                verdict = "met" if ok else "missed" if loras_ok else "– (LoRAs below copy too)"
                written = ", ".join(f"{k} {v}" for k, v in auto.get("written_as", {}).items()) or (
                    "refused" if auto.get("refused") else "–")  # fmt: skip
                rows.append(
                    f"| {target} | {style} | {adapter} | {_fmt(auto['style'], auto['style_se'])} | "
                    f"{_fmt(copy['style'], copy['style_se']) if copy else '–'} | {mark or '–'} | {written} | "
                    f"{' '.join(f'{a} {m}' for a, m in loras.items()) or '–'} | {verdict} |"
                )
    if not rows:
        return []
    return [
        "### LyCORIS adapters: auto vs copy",
        "",
        "LoHa/LoKr adapters (made as LyCORIS makes them, read by the core's LyCORIS reader): `auto`'s style against "
        "`copy`'s (▲/▼/=: 95 % intervals), how `auto` wrote the layers, and the LoRA adapters' `auto` vs `copy` on the "
        "same target and style. Target: `auto` ≥ `copy` (▲ or =) wherever every LoRA's is.",
        "",
        "| target | style | adapter | style (auto) | style (copy) | auto vs copy | auto written as "
        "| LoRAs auto vs copy | target met |",
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
