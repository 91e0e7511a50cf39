"""The generated instrument table says whether each bare related base model draws its content (≥ 0.9)."""

from __future__ import annotations

from typing import Any

from benchmarks.quality.report import _instrument, _refine_summary, _targets


def _none(content: float, se: float = 0.01) -> dict[str, Any]:
    return {"content": content, "content_se": se, "look": 1.0, "look_se": 0.0, "style": 0.0, "style_se": 0.0}


def _doc() -> dict[str, Any]:
    cell = lambda c: {"adapters": {"palette/lora_r8": {"methods": {"none": _none(c)}}}}  # noqa: E731
    return {
        "classifier_clean_accuracy": {f"base/plain/{k}": 1.0 for k in ("content", "style", "domain")},
        "source_reference": {"palette/lora_r8": {"none": _none(0.97)}},
        "targets": {"finetuned": cell(0.93), "heavy": cell(0.85), "unrelated": cell(0.30)},
    }


def test_bare_models_get_a_verdict_and_the_control_none() -> None:
    rows = [line for line in _instrument(_doc()) if line.startswith("| source") or line.startswith("| finetuned")
            or line.startswith("| heavy") or line.startswith("| unrelated")]  # fmt: skip
    assert rows == [
        "| source | 0.97 ± 0.02 | 1.00 ± 0.00 | met |",
        "| finetuned | 0.93 ± 0.02 | 1.00 ± 0.00 | met |",
        "| heavy | 0.85 ± 0.02 | 1.00 ± 0.00 | missed (-0.05) |",
        "| unrelated | 0.30 ± 0.02 | 1.00 ± 0.00 | — (control) |",
    ]


def _scores(style: float, content: float, look: float = 1.0, se: float = 0.01) -> dict[str, Any]:
    return {"style": style, "style_se": se, "content": content, "content_se": se, "look": look, "look_se": se}


def test_targets_say_when_the_retrained_adapter_misses_copys_content_too() -> None:
    def cell(retrained_content: float) -> dict[str, Any]:
        return {"methods": {"copy": _scores(0.2, 0.95), "retrained": _scores(0.9, retrained_content),
                            "refine:default": _scores(0.9, 0.60)}}  # fmt: skip

    doc = {"targets": {"reparam": {"adapters": {"stripes/lora_r8": cell(0.62)}},
                       "shallow": {"adapters": {"stripes/lora_r8": cell(0.97)}}}}  # fmt: skip
    rows = [line for line in _targets(doc) if line.startswith("| reparam") or line.startswith("| shallow")]
    assert len(rows) == 2
    assert "0.60 ± 0.02 vs 0.95 ± 0.02: missed (-0.35; retrained too, 0.62)" in rows[0]
    assert "0.60 ± 0.02 vs 0.95 ± 0.02: missed (-0.35) |" in rows[1]  # retrained keeps copy's content: no excuse
    assert rows[0].startswith("| reparam | stripes/lora_r8 | 1.00× ± 0.03: met |")


def test_a_style_shortfall_under_half_a_hundredth_is_not_printed_as_zero() -> None:
    methods = {"copy": _scores(0.01, 0.93), "retrained": _scores(1.0, 0.3), "refine:default": _scores(0.996, 0.94)}
    rows = [line for line in _targets({"targets": {"heavy": {"adapters": {"palette/lora_r8": {"methods": methods}}}}})
            if line.startswith("| heavy")]  # fmt: skip
    assert "missed (-0.004 vs 1.0×)" in rows[0]


def test_summary_says_when_refinement_kept_the_transfer() -> None:
    run = {"generation_seconds": 1.0, "seconds": 12.0, "steps": 150}
    methods = {"copy": _scores(0.2, 0.95), "auto": _scores(0.86, 0.63), "retrained": _scores(0.87, 0.64),
               "refine:default": {**_scores(0.86, 0.63), **run, "kept": "start"},
               "refine:effect": {**_scores(0.9, 0.6), **run, "kept": "refined"}}  # fmt: skip
    rows = _refine_summary({"targets": {"reparam": {"adapters": {"stripes/lora_r8": {"methods": methods}}}}})
    default = next(line for line in rows if "| refine:default |" in line)
    effect = next(line for line in rows if "| refine:effect |" in line)
    assert default.endswith("| 13 s (150 steps), kept the transfer |")
    assert effect.endswith("| 13 s (150 steps) |")


def test_targets_judge_the_style_on_the_mean_over_seeds_and_content_on_every_seed() -> None:
    methods = {"copy": _scores(0.1, 0.90, look=0.70), "retrained": _scores(1.0, 0.9),
               "refine:default": _scores(1.10, 0.95, look=0.70),
               "refine:default@seed10": _scores(0.70, 0.95, look=0.70),
               "refine:default@seed2": _scores(0.90, 0.80, look=0.60)}  # fmt: skip
    rows = [line for line in _targets({"targets": {"heavy": {"adapters": {"palette/lora_r8": {"methods": methods}}}}})
            if line.startswith("| heavy")]  # fmt: skip
    # seed 0 alone (1.10×) would meet the style target; the mean of the three (0.90×) does not
    assert "| 0.90× (seeds 1.10 / 0.90 / 0.70): missed (-0.10 vs 1.0×) |" in rows[0]
    # seed 2 loses the content and the look: the cell misses both, shown with that seed's scores
    assert "0.80 ± 0.02 vs 0.90 ± 0.02: missed (-0.10) |" in rows[0]
    assert "0.60 ± 0.02 vs 0.70 ± 0.02: missed (-0.10) |" in rows[0]
    alone = {k: v for k, v in methods.items() if "@seed" not in k}
    row = next(line for line in _targets({"targets": {"heavy": {"adapters": {"palette/lora_r8": {"methods": alone}}}}})
               if line.startswith("| heavy"))  # fmt: skip
    assert "| 1.10× ± 0.03: met |" in row


def test_scores_split_the_style_by_look() -> None:
    from benchmarks.quality.evaluate import Scores

    summary = Scores(style=[1.0, 0.9, 0.2, 0.4], content=[1.0] * 4, look=[0.1, 0.3, 0.8, 0.9]).summary()
    assert summary["own_look_share"] == 0.5
    assert abs(summary["style_own_look"] - 0.3) < 1e-12
    assert abs(summary["style_other_look"] - 0.95) < 1e-12
    assert summary["style_other_look_se"] > 0
    only_own = Scores(style=[0.5, 0.7], content=[1.0, 1.0], look=[0.9, 0.6]).summary()
    assert only_own["own_look_share"] == 1.0
    assert only_own["style_other_look"] is None and only_own["style_other_look_se"] is None


def _split(style: float, look: float, own_share: float, own: float | None, other: float | None) -> dict[str, Any]:
    return {**_scores(style, 0.9, look=look), "own_look_share": own_share, "style_own_look": own,
            "style_own_look_se": None if own is None else 0.02, "style_other_look": other,
            "style_other_look_se": None if other is None else 0.01}  # fmt: skip


def test_style_by_look_only_where_the_bare_target_draws_both_looks() -> None:
    from benchmarks.quality.report import _style_by_look

    def cell(bare_look: float) -> dict[str, Any]:
        return {"methods": {"none": _split(0.0, bare_look, bare_look, 0.0, 0.0),
                            "copy": _split(0.6, 0.65, 0.65, 0.45, 0.98),
                            "refine:default": _split(0.7, 0.42, 0.42, 0.34, 1.0),
                            "refine:default@seed1": _split(0.72, 0.45, 0.45, 0.40, 1.0),
                            "retrained": _split(1.0, 0.0, 0.0, None, 1.0)}}  # fmt: skip

    doc = {"config": {"seeds": 20, "per_seed": 32},
           "targets": {"finetuned": {"adapters": {"palette/lora_r16": cell(0.49)}},
                       "heavy": {"adapters": {"palette/lora_r16": cell(1.0)}}}}  # fmt: skip
    rows = [line for line in _style_by_look(doc) if line.startswith("| finetuned") or line.startswith("| heavy")]
    assert [r.split(" | ")[2] for r in rows] == ["none", "copy", "refine:default", "refine:default@seed1", "retrained"]
    assert rows[2] == "| finetuned | palette/lora_r16 | refine:default | 0.42 (269) | 0.34 ± 0.04 | 1.00 ± 0.02 | 0.70 ± 0.02 |"
    assert rows[4] == "| finetuned | palette/lora_r16 | retrained | 0.00 (0) | — | 1.00 ± 0.02 | 1.00 ± 0.02 |"
    # an older quality.json without the split, or no mixed-look target: no section
    assert _style_by_look({"targets": {"heavy": {"adapters": {"palette/lora_r16": cell(1.0)}}}}) == []
