"""The transfer-quality benchmark's ``--quick`` mode runs end to end and its output keeps its invariants.

Numbers are not checked (the quick budgets train nothing useful); structure, ranges and the
refusal of the unrelated target are.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.quality.__main__ import main
from benchmarks.quality.run import LORA_METHODS, LORAX_METHODS, RETRAIN_ON, TARGETS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("quality")
    cache = tmp_path_factory.mktemp("quality-cache")
    assert main(["--quick", "--out", str(out), "--cache", str(cache)]) == 0
    return out, json.loads((out / "quality.json").read_text())


def _unit(value: float | None) -> bool:
    return value is not None and 0.0 <= value <= 1.0 and not math.isnan(value)


def test_document_structure(quick_run: tuple[Path, dict]) -> None:
    _, doc = quick_run
    assert set(doc) >= {"targets", "config", "seconds", "similarity", "source_reference"}
    assert set(doc["targets"]) == set(TARGETS)
    assert doc["config"]["quick"] is True
    assert doc["seconds"] > 0
    for target, body in doc["targets"].items():
        assert body["adapters"], target
        for name, entry in body["adapters"].items():
            methods = entry["methods"]
            expected = set(LORAX_METHODS if entry["kind"] == "lorax" else LORA_METHODS) | {"none"}
            if target in RETRAIN_ON:
                expected.add("retrained")
            assert expected <= set(methods), (target, name, expected - set(methods))
            for method, m in methods.items():
                for field in ("style", "style_std", "content", "content_std", "distance", "distance_std"):
                    assert field in m, (target, name, method, field)


def test_scores_are_probabilities(quick_run: tuple[Path, dict]) -> None:
    _, doc = quick_run
    for target, body in doc["targets"].items():
        for name, entry in body["adapters"].items():
            for method, m in entry["methods"].items():
                assert _unit(m["style"]) and _unit(m["content"]), (target, name, method, m)
                assert m["style_std"] >= 0 and m["content_std"] >= 0
                if target in RETRAIN_ON:
                    assert m["distance"] is not None and m["distance"] >= 0
                else:
                    assert m["distance"] is None  # no retrained reference on the unrelated target


def test_retrained_reference_has_zero_distance_to_itself(quick_run: tuple[Path, dict]) -> None:
    _, doc = quick_run
    for target in RETRAIN_ON:
        for entry in doc["targets"][target]["adapters"].values():
            assert entry["methods"]["retrained"]["distance"] == pytest.approx(0.0, abs=1e-6)


def test_unrelated_target_is_refused_by_default_threshold(quick_run: tuple[Path, dict]) -> None:
    _, doc = quick_run
    for name, entry in doc["targets"]["unrelated"]["adapters"].items():
        for method in ("project", "prolora", "exact", "auto"):
            assert entry["methods"][method]["refused"] is True, (name, method)
        if entry["kind"] == "lora":
            assert entry["methods"]["copy"]["refused"] is False  # copy never checks similarity


def test_similarity_statistics_per_target(quick_run: tuple[Path, dict]) -> None:
    _, doc = quick_run
    assert set(doc["similarity"]) == set(TARGETS)
    assert doc["similarity"]["unrelated"]["families"]
    for target in RETRAIN_ON:
        stats = doc["similarity"][target]
        assert stats["layers"] and stats["families"]
        for row in stats["layers"]:
            if row["normalised_phi"] is not None:
                assert row["phi_left"] is not None and 0.0 <= row["phi_left"] <= 1.0 + 1e-6


def test_grids_and_markdown_written(quick_run: tuple[Path, dict]) -> None:
    out, _ = quick_run
    for target in ("source", *TARGETS):
        png = out / f"quality_{target}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "QUALITY.md").read_text()
    assert "<!-- generated:start -->" in text and "### Target `shallow`" in text
