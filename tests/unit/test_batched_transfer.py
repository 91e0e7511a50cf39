"""The batched (CUDA-path) provider inside transfer_adapter and compute_similarity, run on the CPU.

On CUDA a ``SubspaceProvider`` decomposes in batches (``lorax_core.batched``) and the transfer
prefetches each chunk of layers' subspaces at once. These tests force that path on the CPU
(``batched=True``) and hold it to the one-layer path, whose subspaces match a float64 SVD to
~1e-6 (tests/unit/test_linalg.py): same decisions, same layers, ΔW within 1e-3 relative.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch

import lorax_core.subspaces as subspaces_module
from lorax_core.cache import DiskCache
from lorax_core.similarity import compute_similarity
from lorax_core.subspaces import SubspaceProvider
from lorax_core.transfer import transfer_adapter
from lorax_core.types import DictWeights, LoraFactors, TransferOptions


def _weight(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """A weight with a slowly decaying spectrum (s_i ∝ i^-0.7), like a trained layer's."""
    d = min(m, n)
    p, _ = torch.linalg.qr(torch.randn(m, d, generator=gen))
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=gen))
    return (p * torch.arange(1, d + 1, dtype=torch.float32) ** -0.7) @ q.T


def _models() -> tuple[DictWeights, DictWeights, dict[str, LoraFactors]]:
    """Source, fine-tuned target and a rank-4 LoRA over layers of three shapes plus odd cases."""
    gen = torch.Generator().manual_seed(0)
    source: dict[str, torch.Tensor] = {}
    target: dict[str, torch.Tensor] = {}
    shapes = [(64, 64)] * 5 + [(64, 160)] * 4 + [(160, 64)] * 3
    for i, (m, n) in enumerate(shapes):
        w = _weight(m, n, gen)
        source[f"l{i}.weight"] = w
        target[f"l{i}.weight"] = w + 0.002 * torch.randn(m, n, generator=gen)
    source["unrelated.weight"], target["unrelated.weight"] = _weight(64, 64, gen), _weight(64, 64, gen)
    source["wide.weight"], target["wide.weight"] = _weight(64, 64, gen), _weight(64, 96, gen)
    source["damaged.weight"] = _weight(64, 64, gen)
    target["damaged.weight"] = source["damaged.weight"].clone()
    target["damaged.weight"][3, 5] = float("nan")
    source["conv.weight"] = _weight(32, 72, gen).reshape(32, 8, 3, 3)
    target["conv.weight"] = source["conv.weight"] + 0.002 * torch.randn(32, 8, 3, 3, generator=gen)
    lora: dict[str, LoraFactors] = {}
    for key, w in source.items():
        m, n = w.shape[0], w[0].numel()
        up, down = torch.randn(m, 4, generator=gen), torch.randn(4, n, generator=gen)
        if w.ndim == 4:
            up, down = up.reshape(m, 4, 1, 1), down.reshape(4, *w.shape[1:])
        lora[key] = LoraFactors(up=up, down=down, alpha=2.0)
    return DictWeights(source, fingerprint="source"), DictWeights(target, fingerprint="target"), lora


OPTIONS = TransferOptions(rank=16, method="auto")


def _delta(f: LoraFactors) -> torch.Tensor:
    return f.up2d().double() @ f.down2d().double() * f.scale


def _summary(result: object) -> dict[str, tuple[str, str]]:
    return {r.key: (r.status, r.code) for r in result.report.layers}  # type: ignore[attr-defined]


def test_batched_transfer_makes_the_same_decisions_and_updates(tmp_path: Path) -> None:
    source, target, lora = _models()
    reference = transfer_adapter(lora, source, target, OPTIONS)
    provider = SubspaceProvider(DiskCache(tmp_path), "cpu", batched=True)
    batched = transfer_adapter(lora, source, target, OPTIONS, provider=provider)
    assert _summary(batched) == _summary(reference)
    codes = {key: code for key, (_, code) in _summary(batched).items()}
    assert codes["unrelated.weight"] == "below_threshold"
    assert codes["wide.weight"] == "width"
    assert codes["damaged.weight"] == "nonfinite_weight"
    assert codes["l0.weight"] == "" and codes["conv.weight"] == ""
    assert provider.batch_stats.layers >= 2 * 12 and provider.batch_stats.batches >= 3
    assert set(batched.layers) == set(reference.layers)
    for key, want in reference.layers.items():
        got, exp = _delta(batched.layers[key]), _delta(want)
        assert float((got - exp).norm() / exp.norm()) < 1e-3, key
        assert batched.layers[key].up.device.type == "cpu"


def test_chunks_give_the_same_result_and_are_cancel_points(monkeypatch: pytest.MonkeyPatch) -> None:
    source, target, lora = _models()
    whole = transfer_adapter(lora, source, target, OPTIONS, provider=SubspaceProvider(None, "cpu", batched=True))
    monkeypatch.setattr(subspaces_module, "CHUNK_SUBSPACE_BYTES", 1)  # one layer per chunk
    calls: list[tuple[int, int]] = []
    chunked = transfer_adapter(
        lora,
        source,
        target,
        OPTIONS,
        provider=SubspaceProvider(None, "cpu", batched=True),
        progress=lambda done, total: calls.append((done, total)),
    )
    assert _summary(chunked) == _summary(whole)
    for key, want in whole.layers.items():
        assert torch.equal(chunked.layers[key].up, want.up) and torch.equal(chunked.layers[key].down, want.down)
    # Every decomposed layer's chunk reports once before its layer (same ``done``): a cancel point.
    total = len(lora)
    assert calls[-1] == (total, total)
    repeats = sum(1 for a, b in pairwise(calls) if a == b)
    assert repeats >= 12


def test_cancel_during_batched_decomposition_leaves_only_whole_cache_entries(tmp_path: Path) -> None:
    source, target, lora = _models()

    class CancelledError(Exception):
        pass

    def progress(done: int, total: int) -> None:
        if done == 0:  # the first chunk's cancel point, before any layer is transferred
            raise CancelledError

    with pytest.raises(CancelledError):
        transfer_adapter(
            lora, source, target, OPTIONS, provider=SubspaceProvider(DiskCache(tmp_path), "cpu", batched=True),
            progress=progress,
        )  # fmt: skip
    cache = DiskCache(tmp_path)
    files = list(cache.directory.glob("*.safetensors"))
    assert files  # the first chunk's subspaces were written (flushed) before the cancel returned
    assert not list(cache.directory.glob(".*"))  # no temporary file left behind
    # Every entry written is whole: a warm batched run reads them and agrees with a cold one.
    warm = transfer_adapter(lora, source, target, OPTIONS, provider=SubspaceProvider(cache, "cpu", batched=True))
    assert cache.stats.hits >= len(files) - 1 and cache.stats.corrupt == 0
    assert _summary(warm) == _summary(transfer_adapter(lora, source, target, OPTIONS))


def test_batched_similarity_table_matches_the_one_layer_path() -> None:
    source, target, _ = _models()
    pairs = [(k, k) for k in source.keys() if k != "damaged.weight"]
    reference = compute_similarity(source, target, pairs, rank=16)
    batched = compute_similarity(source, target, pairs, rank=16, provider=SubspaceProvider(None, "cpu", batched=True))
    for want, got in zip(reference.entries, batched.entries, strict=True):
        assert (got.source_key, got.passed, got.reason) == (want.source_key, want.passed, want.reason)
        if want.phi is not None:
            assert got.phi == pytest.approx(want.phi, abs=1e-4)
