"""auto pairing on a target that renumbers its blocks (SDXL → SSD-1B keeps some transformer blocks, numbered 0..k).

The name is a hint: where a container's depth differs, a same-named pair is kept only when Φ
passes, and the rest are paired by similarity within the same container; equal-depth containers
keep pairing by name without any decomposition.
"""

from __future__ import annotations

import pytest
import torch

from lorax_core.matching import DEPTH_NONE, DEPTH_TAKEN, match_layers
from lorax_core.transfer import transfer_adapter
from lorax_core.types import DictWeights, SkipReason, TransferOptions

DEEP = "diffusion_model.input_blocks.7.1"  # 10 blocks in the source, 4 kept in the target
FLAT = "diffusion_model.input_blocks.4.1"  # 2 blocks in both
KINDS = {"attn1.to_q": (48, 48), "attn2.to_k": (48, 80), "ff.net.2": (48, 96)}
KEEP = (0, 3, 6, 9)  # source blocks the target keeps, renumbered 0..3


def _key(block: str, i: int, kind: str) -> str:
    return f"{block}.transformer_blocks.{i}.{kind}.weight"


class CountingWeights(DictWeights):
    """DictWeights that counts reads, to show where no decomposition happens."""

    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        super().__init__(data)
        self.reads: list[str] = []

    def get(self, key: str) -> torch.Tensor:
        self.reads.append(key)
        return super().get(key)


def _weight(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """A matrix with a decaying spectrum (A·diag(1/i)·B, no QR: cheap on a loaded CI machine)."""
    k = min(m, n)
    return (torch.randn(m, k, generator=gen) / torch.arange(1, k + 1)) @ torch.randn(k, n, generator=gen) / k**0.5


@pytest.fixture
def ssd_like(rng):
    """(source, target): the target keeps blocks KEEP of DEEP as 0..3 (fine-tuned), all of FLAT, and proj_in."""
    source: dict[str, torch.Tensor] = {}
    for kind, (m, n) in KINDS.items():
        for i in range(10):
            source[_key(DEEP, i, kind)] = _weight(m, n, rng)
        for i in range(2):
            source[_key(FLAT, i, kind)] = _weight(m, n, rng)
    source[f"{DEEP}.proj_in.weight"] = _weight(48, 48, rng)

    def tune(w: torch.Tensor) -> torch.Tensor:
        return w + 0.03 * w.norm() * torch.randn(w.shape, generator=rng) / w.numel() ** 0.5

    target = {k: tune(v) for k, v in source.items() if ".transformer_blocks." not in k or k.startswith(FLAT)}
    for kind in KINDS:
        for j, i in enumerate(KEEP):
            target[_key(DEEP, j, kind)] = tune(source[_key(DEEP, i, kind)])
    return source, target


@pytest.mark.parametrize("direction", ["distilled", "expanded"])
def test_auto_pairs_every_renumbered_layer_with_its_true_partner(ssd_like, direction) -> None:
    source_sd, target_sd = ssd_like
    if direction == "expanded":  # SSD-1B-like source onto the SDXL-like model it came from
        source_sd, target_sd = target_sd, source_sd
    source, target = CountingWeights(source_sd), CountingWeights(target_sd)
    matches = match_layers(list(source_sd), source, target, mode="auto", rank=16)
    for kind in KINDS:
        for j, i in enumerate(KEEP):
            s, t = (_key(DEEP, i, kind), _key(DEEP, j, kind))
            if direction == "expanded":
                s, t = t, s
            m = matches[s]
            assert m.target_key == t, f"{s} paired with {m.target_key}"
            assert m.by == ("name" if s == t else "similarity")
            assert m.similarity is not None and m.similarity.passed
        for i in range(2):
            flat = matches[_key(FLAT, i, kind)]
            assert (flat.target_key, flat.by, flat.similarity) == (_key(FLAT, i, kind), "name", None)
    if direction == "distilled":
        dropped = [_key(DEEP, i, kind) for kind in KINDS for i in range(10) if i not in KEEP]
        assert all(matches[k].target_key is None and matches[k].reason == DEPTH_TAKEN for k in dropped)
    assert matches[f"{DEEP}.proj_in.weight"].by == "name"
    # Equal-depth containers and proj_in are paired by name without reading a weight.
    assert not [k for k in source.reads + target.reads if k.startswith(FLAT) or "proj_in" in k]


def test_transfer_reports_every_layer_and_skips_none_that_has_a_partner(ssd_like, make_factors) -> None:
    source_sd, target_sd = ssd_like
    layers = {k: make_factors(*v.shape, 4) for k, v in source_sd.items()}
    res = transfer_adapter(layers, DictWeights(source_sd), DictWeights(target_sd), TransferOptions(rank=16))
    report = {r.source_key: r for r in res.report.layers}
    assert set(report) == set(layers)
    dropped = {_key(DEEP, i, kind) for kind in KINDS for i in range(10) if i not in KEEP}
    transferred = {r.source_key for r in res.report.transferred}
    assert transferred == set(layers) - dropped
    assert all(report[k].reason == DEPTH_TAKEN for k in dropped)
    assert report[_key(DEEP, 3, "attn1.to_q")].target_key == _key(DEEP, 1, "attn1.to_q")
    assert "paired by similarity with" in report[_key(DEEP, 9, "ff.net.2")].reason
    assert set(res.layers) == set(target_sd)  # each target layer receives exactly one update


def test_name_mode_meets_the_wrong_namesake(ssd_like, make_factors) -> None:
    """What the issue saw: by name, a renumbered block meets another layer and scores at chance."""
    source_sd, target_sd = ssd_like
    key, ok = _key(DEEP, 1, "attn1.to_q"), _key(FLAT, 0, "attn1.to_q")  # target block 1 holds source block 3
    layers = {key: make_factors(48, 48, 4), ok: make_factors(48, 48, 4)}
    options = TransferOptions(rank=16, match="name")
    res = transfer_adapter(layers, DictWeights(source_sd), DictWeights(target_sd), options)
    report = {r.source_key: r for r in res.report.layers}
    assert report[key].reason == SkipReason.BELOW.text and report[key].target_key == key
    auto = transfer_adapter(layers, DictWeights(source_sd), DictWeights(target_sd), TransferOptions(rank=16))
    moved = {r.source_key: r for r in auto.report.layers}[key]
    assert moved.status == "skipped" and moved.reason == DEPTH_NONE  # block 1 was dropped: reported, not mis-paired


def test_a_damaged_candidate_is_no_partner(ssd_like) -> None:
    """A target weight with NaN (or never loaded) is left out of the candidates instead of stopping the match."""
    source_sd, target_sd = ssd_like
    target_sd = dict(target_sd)
    target_sd[_key(DEEP, 2, "attn1.to_q")] = torch.full((48, 48), float("nan"))  # holds source block 6
    matches = match_layers(list(source_sd), DictWeights(source_sd), DictWeights(target_sd), mode="auto", rank=16)
    assert matches[_key(DEEP, 3, "attn1.to_q")].target_key == _key(DEEP, 1, "attn1.to_q")
    assert matches[_key(DEEP, 9, "attn1.to_q")].target_key == _key(DEEP, 3, "attn1.to_q")
    assert matches[_key(DEEP, 6, "attn1.to_q")].target_key is None
    assert matches[_key(DEEP, 6, "attn1.to_q")].reason == DEPTH_TAKEN
