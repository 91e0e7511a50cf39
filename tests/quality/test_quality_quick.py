"""The transfer-quality benchmark's ``--quick`` mode runs end to end and its output keeps its invariants.

Numbers are not checked (the quick budgets train nothing useful); structure, ranges and the
refusal of the unrelated target are.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.quality import data
from benchmarks.quality.__main__ import main
from benchmarks.quality.run import (
    ALL_LORA_METHODS,
    ALL_LORAX_METHODS,
    EXTRAS_ON,
    LORA_METHODS,
    REFINE_EVERY_ADAPTER_ON,
    REFINE_ON,
    RETRAIN_ON,
    TARGET_DOMAIN,
    TARGETS,
    VARIANTS_ON,
    BenchConfig,
)
from benchmarks.quality.train import LYCORIS_KINDS

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
    assert set(doc) >= {"targets", "config", "seconds", "similarity", "source_reference", "domains"}
    assert set(doc["targets"]) == set(TARGETS)
    assert {"finetuned", "heavy", "reparam", "shallow", "unrelated"} <= set(TARGETS)
    assert doc["config"]["quick"] is True
    assert doc["seconds"] > 0
    for target, body in doc["targets"].items():
        assert body["adapters"], target
        assert body["domain"] == TARGET_DOMAIN[target] == doc["domains"][target]
        for name, entry in body["adapters"].items():
            methods = entry["methods"]
            # --quick runs every method (all_methods); LoHa/LoKr cells only copy and auto
            if entry["kind"] in LYCORIS_KINDS:
                expected = {*LORA_METHODS, "none"}
                assert not {"project", "prolora", "exact"} & set(methods), (target, name)
            else:
                expected = set(ALL_LORAX_METHODS if entry["kind"] == "lorax" else ALL_LORA_METHODS) | {"none"}
            if target in RETRAIN_ON:
                expected.add("retrained")
            assert expected <= set(methods), (target, name, expected - set(methods))
            for method, m in methods.items():
                for field in (
                    "style", "style_se", "content", "content_se", "look", "look_se", "distance", "distance_se",
                ):  # fmt: skip
                    assert field in m, (target, name, method, field)


def test_scores_are_probabilities(quick_run: tuple[Path, dict]) -> None:
    _, doc = quick_run
    for target, body in doc["targets"].items():
        for name, entry in body["adapters"].items():
            for method, m in entry["methods"].items():
                assert _unit(m["style"]) and _unit(m["content"]) and _unit(m["look"]), (target, name, method, m)
                assert m["style_se"] >= 0 and m["content_se"] >= 0 and m["look_se"] >= 0
                if target in RETRAIN_ON:
                    assert m["distance"] is not None and m["distance"] >= 0
                else:
                    assert m["distance"] is None  # no retrained reference on the unrelated target


def test_style_split_by_look_adds_up_to_the_style(quick_run: tuple[Path, dict]) -> None:
    _, doc = quick_run
    for target, body in doc["targets"].items():
        for name, entry in body["adapters"].items():
            for method, m in entry["methods"].items():
                share, own, other = m["own_look_share"], m["style_own_look"], m["style_other_look"]
                assert _unit(share), (target, name, method)
                assert (own is None) == (share == 0.0) and (other is None) == (share == 1.0), (target, name, method)
                total = share * (own or 0.0) + (1 - share) * (other or 0.0)
                assert total == pytest.approx(m["style"], abs=1e-9), (target, name, method)


def test_retrained_reference_has_zero_distance_to_itself(quick_run: tuple[Path, dict]) -> None:
    _, doc = quick_run
    for target in RETRAIN_ON:
        for entry in doc["targets"][target]["adapters"].values():
            assert entry["methods"]["retrained"]["distance"] == pytest.approx(0.0, abs=1e-6)


def test_unrelated_target_is_refused_by_default_threshold(quick_run: tuple[Path, dict]) -> None:
    _, doc = quick_run
    for name, entry in doc["targets"]["unrelated"]["adapters"].items():
        for method in ("project", "prolora", "exact", "auto"):
            if method in entry["methods"]:
                assert entry["methods"][method]["refused"] is True, (name, method)
        assert entry["methods"]["auto"]["refused"] is True, name
        if entry["kind"] in ("lora", *LYCORIS_KINDS):
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
    assert "### Target `heavy`" in text and "### Target `reparam`" in text
    assert "| look |" in text
    assert "### The instrument" in text and "Bare base models" in text and "Standard error of a cell's mean" in text
    assert "95 % interval" in text


def test_extras_only_on_their_targets(quick_run: tuple[Path, dict]) -> None:
    _, doc = quick_run
    for target, body in doc["targets"].items():
        methods = set().union(*(entry["methods"] for entry in body["adapters"].values()))
        extras = {m for m in methods if m.startswith("rule:") or "@R" in m}
        assert bool(extras) == (target in EXTRAS_ON), (target, extras)


def test_refused_methods_sample_the_bare_target(quick_run: tuple[Path, dict]) -> None:
    _, doc = quick_run
    for entry in doc["targets"]["unrelated"]["adapters"].values():
        none = entry["methods"]["none"]
        for method in ("exact", "auto"):
            if method not in entry["methods"]:  # LoHa/LoKr cells score copy and auto only
                continue
            m = entry["methods"][method]
            assert m["refused"] is True
            assert (m["style"], m["content"], m["look"]) == (none["style"], none["content"], none["look"])


def test_classifier_reports_domain_accuracy(quick_run: tuple[Path, dict]) -> None:
    _, doc = quick_run
    accuracy = doc["classifier_clean_accuracy"]
    for domain in data.DOMAINS:
        for style in data.STYLES:
            assert _unit(accuracy[f"{domain}/{style}/domain"]), (domain, style)
    assert doc["source_reference"] and all("look" in ref["adapter"] for ref in doc["source_reference"].values())


def test_refine_rows_on_their_targets_only(quick_run: tuple[Path, dict]) -> None:
    out, doc = quick_run
    quick = BenchConfig.quick_config()
    variants = {f"refine:{name}" for name, _ in quick.refine_variants}
    seeds = {f"refine:default@seed{seed}" for seed in quick.refine_seeds}
    for target, body in doc["targets"].items():
        first = next(iter(body["adapters"])).split("/")[1]
        for name, entry in body["adapters"].items():
            refined = {m for m in entry["methods"] if m.startswith("refine:")}
            is_first = name.split("/")[1] == first
            expected = set()
            refinable = entry["kind"] not in LYCORIS_KINDS  # LoHa/LoKr cells are not refined
            if target in REFINE_ON and refinable and (is_first or target in REFINE_EVERY_ADAPTER_ON):
                # the defaults (with further seeds on REFINE_EVERY_ADAPTER_ON); comparisons on the
                # first LoRA adapter of VARIANTS_ON
                expected = {"refine:default"} | (seeds if target in REFINE_EVERY_ADAPTER_ON else set())
                expected |= variants if is_first and target in VARIANTS_ON else set()
            assert refined == expected, (target, name, refined)
            for method in refined:
                m = entry["methods"][method]
                assert m["start"] == "auto" and m["kept"] in ("refined", "start")
                assert m["holdout_after"] <= m["holdout_before"]
                assert m["seconds"] >= 0 and m["generation_seconds"] > 0
            if target in REFINE_EVERY_ADAPTER_ON and refinable:  # another seed draws other probes
                seed0, seed1 = (entry["methods"][m]["holdout_before"] for m in ("refine:default", "refine:default@seed1"))
                assert seed0 != seed1
    text = (out / "QUALITY.md").read_text()
    assert "### Summary: training-free transfer, data-free refinement, retraining" in text
    assert "### Targets: refinement at the node's defaults" in text


def test_identical_layers_reuse_their_samples(quick_run: tuple[Path, dict]) -> None:
    _, doc = quick_run
    for body in doc["targets"].values():
        for entry in body["adapters"].values():
            for m in entry["methods"].values():
                if "same_as" in m:
                    twin = entry["methods"][m["same_as"]]
                    assert (m["style"], m["content"], m["look"]) == (twin["style"], twin["content"], twin["look"])


def test_lycoris_adapters_are_scored_and_written(quick_run: tuple[Path, dict]) -> None:
    out, doc = quick_run
    names = {name.split("/")[1] for name in doc["source_reference"]}
    assert {"loha_r4", "lokr"} <= names
    for target, body in doc["targets"].items():
        kinds = {entry["kind"] for entry in body["adapters"].values()}
        assert set(LYCORIS_KINDS) <= kinds, target
        for name, entry in body["adapters"].items():
            if entry["kind"] not in LYCORIS_KINDS:
                continue
            copy = entry["methods"]["copy"]
            # copy moves every layer unchanged: written in its own type (LyCORIS tensors), never as a LoRA
            assert copy["written_as"] == {entry["kind"]: copy["layers_transferred"]}, (target, name)
            auto = entry["methods"]["auto"]
            if not auto["refused"]:
                assert sum(auto["written_as"].values()) == auto["layers_transferred"] > 0, (target, name)
                assert set(auto["written_as"]) <= {entry["kind"], "lora"}, (target, name)
    text = (out / "QUALITY.md").read_text()
    assert "### LyCORIS adapters: auto vs copy" in text
    for target in TARGETS:
        assert f"| {target} | palette | loha_r4 |" in text and f"| {target} | palette | lokr |" in text
