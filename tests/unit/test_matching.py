"""Layer pairing by name and by similarity (optimal assignment), and its use by transfer_adapter."""

from __future__ import annotations

import re

import pytest
import torch

from lorax_core.errors import OptionError
from lorax_core.matching import ALL_TAKEN, NO_NAME, NO_PARTNER, layer_kind, match_layers
from lorax_core.transfer import transfer_adapter
from lorax_core.types import DictWeights, SkipReason, TransferOptions


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "attn1.to_q"),
        ("diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_out.0.weight", "attn2.to_out.0"),
        ("diffusion_model.output_blocks.2.1.transformer_blocks.0.ff.net.0.proj.weight", "ff.net.0.proj"),
        ("diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2.weight", "ff.net.2"),
        ("diffusion_model.middle_block.1.proj_in.weight", "proj_in"),
        ("diffusion_model.input_blocks.4.0.in_layers.2.weight", "in_layers.2"),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight", "attn1.to_k"),
        ("down_blocks.1.resnets.0.conv1.weight", "conv1"),
        ("diffusion_model.out.2.weight", "diffusion_model.out.2"),
    ],
)
def test_layer_kind(key: str, kind: str) -> None:
    assert layer_kind(key) == kind


def _key(block: int, kind: str = "attn1.to_q") -> str:
    return f"diffusion_model.input_blocks.{block}.1.transformer_blocks.0.{kind}.weight"


@pytest.fixture
def distilled(make_weight, rng):
    """A 5-layer source and a 'distilled' target keeping 4 of them (permuted, renamed, perturbed)
    plus one unrelated same-kind layer; the target also lacks the source's ff layer kind."""
    source = {_key(i): make_weight(96, 96) for i in range(5)}
    source[_key(9, "ff.net.2")] = make_weight(96, 64)
    keep = [3, 0, 4, 1]  # target block j holds source layer keep[j]
    target = {
        _key(20 + j): source[_key(i)] + 0.02 * torch.randn(96, 96, generator=rng) / 96**0.5 for j, i in enumerate(keep)
    }
    target[_key(30)] = make_weight(96, 96)  # planted: unrelated to every source layer
    return DictWeights(source), DictWeights(target), keep


@pytest.mark.parametrize("mode", ["similarity", "auto"])
def test_similarity_matching_recovers_the_permutation(distilled, mode) -> None:
    source, target, keep = distilled
    matches = match_layers(list(source.keys()), source, target, mode=mode, rank=16)
    for j, i in enumerate(keep):
        m = matches[_key(i)]
        assert (m.target_key, m.by) == (_key(20 + j), "similarity")
        assert m.similarity is not None and m.similarity.passed
    planted = matches[_key(2)]  # its true partner was dropped; only the unrelated layer is left
    assert planted.target_key == _key(30) and planted.similarity is not None and not planted.similarity.passed
    assert matches[_key(9, "ff.net.2")].target_key is None
    assert matches[_key(9, "ff.net.2")].reason == NO_PARTNER


def test_transfer_with_similarity_matching_skips_the_planted_layer(distilled, make_factors) -> None:
    source, target, keep = distilled
    layers = {_key(i): make_factors(96, 96, 4) for i in range(5)}
    res = transfer_adapter(layers, source, target, TransferOptions(rank=16, match="similarity"))
    assert set(res.layers) == {_key(20 + j) for j in range(4)}
    rep = {r.source_key: r for r in res.report.layers}
    assert rep[_key(2)].status == "skipped" and rep[_key(2)].reason == SkipReason.BELOW.text
    assert rep[_key(2)].target_key == _key(30)
    assert rep[_key(keep[0])].target_key == _key(20) and "paired by similarity" in rep[_key(keep[0])].reason


def test_name_and_auto_modes(make_weight) -> None:
    W = make_weight(64, 64)
    source = DictWeights({_key(1): W, _key(2): W, _key(3): W})
    target = DictWeights(
        {_key(1): W, _key(2): make_weight(64, 128), _key(7): W, "diffusion_model.bias": torch.ones(64)}
    )
    by_name = match_layers([_key(1), _key(2), _key(3)], source, target, mode="name", rank=16)
    assert by_name[_key(1)].target_key == _key(1) and by_name[_key(2)].target_key == _key(2)
    assert by_name[_key(3)].target_key is None and by_name[_key(3)].reason == NO_NAME
    auto = match_layers([_key(1), _key(2), _key(3)], source, target, mode="auto", rank=16)
    assert auto[_key(1)].by == "name"
    # _key(2) has another width in the target, _key(3) no namesake: both compete for _key(7).
    winners = [k for k in (_key(2), _key(3)) if auto[k].target_key == _key(7)]
    assert len(winners) == 1
    loser = _key(2) if winners == [_key(3)] else _key(3)
    assert auto[loser].target_key is None and auto[loser].reason == ALL_TAKEN


def test_match_mode_error(make_weight) -> None:
    w = DictWeights({_key(1): make_weight(8, 8)})
    with pytest.raises(OptionError, match=re.escape("match must be 'name', 'similarity' or 'auto'; got 'fuzzy'")):
        match_layers([_key(1)], w, w, mode="fuzzy")  # type: ignore[arg-type]


def test_a_damaged_source_weight_is_coded_as_such_not_as_no_partner(make_weight, make_factors) -> None:
    # Pairing by similarity needs the source weight's subspace; NaN in it is a damaged model,
    # which the report must say (nonfinite_weight), not "no partner" (another model's layout).
    W = make_weight(64, 64)
    damaged = W.clone()
    damaged[0, 0] = float("nan")
    source, target = DictWeights({_key(3): damaged}), DictWeights({_key(7): W})
    match = match_layers([_key(3)], source, target, mode="similarity", rank=16)[_key(3)]
    assert match.target_key is None and match.code is SkipReason.NONFINITE_WEIGHT
    assert match_layers([_key(3)], DictWeights({_key(3): W}), DictWeights({}), mode="name")[_key(3)].code is (
        SkipReason.NO_PARTNER
    )
    ok = DictWeights({_key(3): W, _key(4): W})
    lora = {_key(3): make_factors(64, 64, 4), _key(4): make_factors(64, 64, 4)}
    both = DictWeights({_key(3): damaged, _key(4): W})
    result = transfer_adapter(lora, both, ok, TransferOptions(rank=16, match="similarity"))
    codes = {r.source_key: r.code for r in result.report.layers}
    assert codes[_key(3)] is SkipReason.NONFINITE_WEIGHT
