"""Φ, chance level, the similarity-rank and threshold rules, and compute_similarity."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorax_core.errors import OptionError, RankError
from lorax_core.similarity import (
    SimilarityTable,
    chance_level,
    compute_similarity,
    phi,
    similarity_rank,
    threshold_for,
)
from lorax_core.types import DictWeights


def test_identical_subspaces_score_one_under_any_basis_and_signs(make_orthogonal) -> None:
    U = make_orthogonal(100, 20)
    assert phi(U, U) == pytest.approx(1.0, abs=1e-6)
    signs = torch.where(torch.arange(20) % 3 == 0, -1.0, 1.0)
    assert phi(U, U * signs) == pytest.approx(1.0, abs=1e-6)
    rotated = U @ make_orthogonal(20)  # another basis of the same subspace
    assert phi(U, rotated) == pytest.approx(1.0, abs=1e-5)


def test_orthogonal_subspaces_score_zero(make_orthogonal) -> None:
    Q = make_orthogonal(60, 20)
    assert phi(Q[:, :10], Q[:, 10:]) == pytest.approx(0.0, abs=1e-6)


@settings(max_examples=15, deadline=None)
@given(k=st.integers(4, 40), dim=st.integers(100, 200), seed=st.integers(0, 2**16))
def test_random_subspaces_score_near_chance(k: int, dim: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    Ua, _ = torch.linalg.qr(torch.randn(dim, k, generator=gen))
    Ub, _ = torch.linalg.qr(torch.randn(dim, k, generator=gen))
    value = phi(Ua, Ub)
    # Φ·k is a sum of k² squared cosines, each with mean 1/dim and variance ≈ 2/dim², so Φ has
    # mean k/dim and standard deviation ≈ √2/dim; 8 of them is a safe band.
    chance = chance_level(k, dim)
    assert abs(value - chance) < 8 * 2**0.5 / dim
    assert 0.0 <= value <= 1.0


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_phi_is_symmetric_and_unchanged_by_sign_flips(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    Ua, _ = torch.linalg.qr(torch.randn(50, 8, generator=gen))
    Ub, _ = torch.linalg.qr(torch.randn(50, 8, generator=gen))
    flips = torch.randint(0, 2, (8,), generator=gen) * 2.0 - 1.0
    assert phi(Ua, Ub) == pytest.approx(phi(Ub, Ua), abs=1e-6)
    assert phi(Ua, Ub) == pytest.approx(phi(Ua * flips, Ub), abs=1e-6)


def test_similarity_rank_rule() -> None:
    assert similarity_rank(320, 1280, 1280) == 320  # well below: R itself
    assert similarity_rank(320, 640, 640) == 160  # quarter of the smaller side
    assert similarity_rank(320, 320, 320) == 80  # complete basis at R = 320 → decide at 80
    assert similarity_rank(320, 5120, 1280) == 320
    assert similarity_rank(320, 640, 768) == 160
    assert similarity_rank(8, 640, 640) == 8
    assert similarity_rank(320, 3, 3) == 1
    for R, m, n in [(320, 320, 320), (320, 640, 2048), (64, 100, 300)]:
        k = similarity_rank(R, m, n)
        assert max(chance_level(k, m), chance_level(k, n)) <= 0.25


def test_threshold_rule() -> None:
    assert threshold_for(0.25, 0.5) == pytest.approx(0.625)
    assert threshold_for(0.25, 0.0) == pytest.approx(0.25)
    assert threshold_for(0.25, 1.0) == pytest.approx(1.0)
    assert threshold_for(0.0, 0.8) == pytest.approx(0.8)


def test_rule_errors() -> None:
    with pytest.raises(
        OptionError,
        match=re.escape("threshold c must be in [0, 1] (0 = chance level, 1 = identical subspaces); got 1.5"),
    ):
        threshold_for(0.2, 1.5)
    with pytest.raises(RankError, match=re.escape("similarity rank needs positive sizes; got rank=0, out=4, in=4")):
        similarity_rank(0, 4, 4)
    with pytest.raises(RankError, match=re.escape("chance level needs 0 <= k and dim >= 1; got k=1, dim=0")):
        chance_level(1, 0)
    with pytest.raises(
        RankError, match=re.escape("cannot compare subspaces of R^4 and R^5; the layers' widths differ")
    ):
        phi(torch.eye(4), torch.eye(5))


def test_compute_similarity_related_unrelated_and_mismatched(make_weight, make_orthogonal) -> None:
    W = make_weight(128, 128)
    rotated = make_orthogonal(128) @ W @ make_orthogonal(128).T
    source = DictWeights({"a.weight": W, "b.weight": W, "c.weight": W})
    target = DictWeights(
        {"a.weight": W + 1e-3 * make_weight(128, 128, decay=0.0), "b.weight": rotated, "c.weight": torch.ones(64, 128)}
    )
    seen: list[tuple[int, int]] = []
    table = compute_similarity(
        source,
        target,
        [("a.weight", "a.weight"), ("b.weight", "b.weight"), ("c.weight", "c.weight")],
        rank=32,
        progress=lambda d, t: seen.append((d, t)),
    )
    a, b, c = table.entries
    assert a.passed and a.phi is not None and a.phi > 0.95
    assert not b.passed and b.phi is not None and abs(b.phi - b.chance) < 0.15
    assert a.chance == pytest.approx(0.25) and a.rank == 32 and a.threshold == pytest.approx(0.625)
    assert not c.passed and c.phi is None and "width mismatch" in c.reason
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert table.get("b.weight") is b and table.get("zzz") is None
    data = json.loads(json.dumps(table.to_dict()))
    assert data["passed"] == 1 and data["pairs"] == 3
    assert "1 of 3 layer pairs pass" in table.summary()


def test_compute_similarity_uses_the_cache_once_per_weight(make_weight) -> None:
    calls: list[tuple[str, str, int]] = []

    class CountingCache:
        def get_or_compute(self, fingerprint, key, rank, compute):
            calls.append((fingerprint, key, rank))
            return compute()

    W = make_weight(64, 64)
    source = DictWeights({"x.weight": W}, fingerprint="src")
    target = DictWeights({"x.weight": W}, fingerprint="tgt")
    table = compute_similarity(source, target, [("x.weight", "x.weight")], rank=16, cache=CountingCache())
    assert table.entries[0].phi == pytest.approx(1.0, abs=1e-5)
    assert calls == [("src", "x.weight", 16), ("tgt", "x.weight", 16)]


def test_compute_similarity_errors() -> None:
    w = DictWeights({"x.weight": torch.eye(4)})
    with pytest.raises(
        RankError, match=re.escape("similarity: rank must be a positive integer (the paper uses 320); got 0")
    ):
        compute_similarity(w, w, [], rank=0)
    with pytest.raises(OptionError, match=re.escape("threshold c must be in [0, 1]")):
        compute_similarity(w, w, [], threshold=-0.1)


def test_empty_table_summary() -> None:
    assert SimilarityTable().summary().startswith("subspace similarity: 0 of 0")
