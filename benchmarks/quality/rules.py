"""Candidate per-layer ``auto`` rules and the per-layer similarity statistics of a transfer.

A rule looks at one layer's record from the ``exact`` transfer (its Φ, chance level, layer
kind and the norms before/after) and picks which method's output to keep for that layer.
The benchmark composes the per-method :class:`~lorax_core.types.TransferResult` objects
layer by layer, so a rule is evaluated exactly as ``lorax_core.transfer.choose_method``
would apply it, without touching the core.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping

from lorax_core.matching import layer_kind
from lorax_core.types import LayerReport, LoraFactors, TransferResult

__all__ = ["CANDIDATES", "compose", "group", "normalised_phi", "similarity_stats"]

#: What a rule returns per layer: a method name, optionally with ``"+norm"`` to rescale the
#: output to the source update's Frobenius norm (undoing the projection's shrinkage).
Rule = Callable[[LayerReport], str]


def group(key: str) -> str:
    """Coarse layer family: ``conv3x3`` (ResBlock convs), ``proj`` (1×1 proj_in/out), ``attn1``, ``attn2``, ``ff``."""
    kind = layer_kind(key)
    if kind in ("in_layers.2", "out_layers.3"):
        return "conv3x3"
    if kind in ("proj_in", "proj_out"):
        return "proj"
    return kind.split(".")[0]


def normalised_phi(entry: LayerReport) -> float | None:
    """``(min(Φ_l, Φ_r) − chance) / (1 − chance)``: 0 at chance level, 1 for identical subspaces."""
    if entry.phi_left is None or entry.phi_right is None or entry.chance is None:
        return None
    return (min(entry.phi_left, entry.phi_right) - entry.chance) / max(1e-9, 1.0 - entry.chance)


def _similar_copy(entry: LayerReport) -> str:
    p = normalised_phi(entry)
    return "copy" if p is not None and p >= 0.9 else "exact"


CANDIDATES: dict[str, Rule] = {
    # copy where the layer barely moved (normalised Φ ≥ 0.9), the exact 4-block map elsewhere
    "rule:copy_if_similar": _similar_copy,
    # convs keep their update (copy), attention/feed-forward layers are mapped exactly
    "rule:copy_conv": lambda e: "copy" if group(e.key) in ("conv3x3", "proj") else "exact",
    # LoRA-X Eq. 3 on a LoRA, rescaled back to the source update's norm
    "rule:project+norm": lambda e: "project+norm",
}


def compose(
    rule: Rule, transfers: Mapping[str, TransferResult | None], source_layers: Mapping[str, object]
) -> TransferResult | None:
    """The adapter a rule would produce, from the per-method transfers of the same adapter.

    The layer set and report come from the ``exact`` transfer (same matching and threshold);
    each transferred layer takes the factors of the method the rule names.
    """
    base = transfers.get("exact")
    if base is None:
        return None
    layers: dict[str, LoraFactors] = {}
    for entry in base.report.transferred:
        tkey = entry.target_key or entry.key
        choice = rule(entry)
        method, _, norm = choice.partition("+")
        result = transfers.get(method)
        if result is None or tkey not in result.layers:
            continue
        f = result.layers[tkey]
        if norm and entry.norm_source:
            got = float((f.up2d().float() @ f.down2d().float()).norm())
            if got > 0:
                f = LoraFactors(up=f.up * (entry.norm_source / got), down=f.down, alpha=f.alpha)
        layers[tkey] = f
    return TransferResult(layers=layers, report=base.report)


def similarity_stats(transfers: Mapping[str, TransferResult | None]) -> dict[str, object]:
    """Per-layer Φ, verdicts and norm ratios ‖ΔW_t‖/‖ΔW_s‖ per method, and per-family summaries."""
    base = transfers.get("exact") or next((t for t in transfers.values() if t is not None), None)
    if base is None:
        return {"layers": [], "families": {}, "refused": True}
    rows: list[dict[str, object]] = []
    for entry in base.report.layers:
        ratios: dict[str, float | None] = {}
        for method, result in transfers.items():
            rec = None if result is None else next((r for r in result.report.layers if r.key == entry.key), None)
            ok = rec is not None and rec.status == "transferred" and rec.norm_source and rec.norm_target is not None
            ratios[method] = round(rec.norm_target / rec.norm_source, 4) if ok and rec else None  # type: ignore[operator]
        p = normalised_phi(entry)
        rows.append({
            "key": entry.key.removeprefix("diffusion_model.").removesuffix(".weight"),
            "target": (entry.target_key or "").removeprefix("diffusion_model.").removesuffix(".weight"),
            "family": group(entry.key),
            "status": entry.status,
            "phi_left": entry.phi_left, "phi_right": entry.phi_right, "chance": entry.chance,
            "threshold": entry.threshold, "normalised_phi": None if p is None else round(p, 4),
            "norm_ratio": ratios,
        })  # fmt: skip
    families: dict[str, dict[str, object]] = {}
    for fam in sorted({str(r["family"]) for r in rows}):
        sel = [r for r in rows if r["family"] == fam]
        phis = [float(r["normalised_phi"]) for r in sel if r["normalised_phi"] is not None]  # type: ignore[arg-type]
        summary: dict[str, object] = {
            "layers": len(sel),
            "transferred": sum(r["status"] == "transferred" for r in sel),
            "normalised_phi_mean": round(statistics.fmean(phis), 4) if phis else None,
            "normalised_phi_min": round(min(phis), 4) if phis else None,
        }
        for method in transfers:
            vals = [r["norm_ratio"][method] for r in sel if r["norm_ratio"][method] is not None]  # type: ignore[index]
            summary[f"norm_ratio_{method}"] = round(statistics.fmean(vals), 4) if vals else None
        families[fam] = summary
    return {"layers": rows, "families": families, "refused": False}
