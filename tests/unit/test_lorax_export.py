"""LoRA-X → standard LoRA export and the source-basis record (lorax_core.lorax_export)."""

from __future__ import annotations

import json

import pytest
import torch

from lorax_core.errors import FormatError, IncompatibleBaseError, RankError
from lorax_core.linalg import top_subspace
from lorax_core.lorax_export import (
    BASIS_KEY,
    basis_record,
    check_lorax_source,
    compress_standard,
    lorax_to_standard,
)
from lorax_core.lorax_module import LoraXDelta
from lorax_core.subspaces import SubspaceProvider
from lorax_core.types import LoraXFactors

CORES = {"a.weight": LoraXFactors(core=torch.ones(2), shape=(48, 40))}  # any adapter with a LoRA-X layer


class Weights:
    """A minimal in-memory WeightSource."""

    def __init__(self, tensors: dict[str, torch.Tensor], fingerprint: str) -> None:
        self.tensors, self.fingerprint = tensors, fingerprint

    def keys(self):
        return iter(self.tensors)

    def __contains__(self, key: object) -> bool:
        return key in self.tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key].float().clone()


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(48, 40, generator=g),
        "b.weight": torch.randn(32, 24, generator=g),
        "c.weight": torch.randn(16, 8, 3, 3, generator=g),
    }


def _cores(weights: dict[str, torch.Tensor], R: int, seed: int = 5, full: bool = False) -> dict[str, LoraXFactors]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: LoraXFactors(core=torch.randn((R, R) if full else (R,), generator=g), shape=tuple(w.shape))
        for k, w in weights.items()
    }


def _bases(weights: dict[str, torch.Tensor]):
    return lambda key, rank: top_subspace(weights[key], rank)


def _delta_w(f: LoraXFactors, w: torch.Tensor) -> torch.Tensor:
    """ΔW from the trainer's own module (LoraXDelta with the core set), flattened."""
    module = LoraXDelta(top_subspace(w, f.rank), tuple(w.shape), full_core=f.core.ndim == 2)
    with torch.no_grad():
        module.core.copy_(f.core)
    return module.delta()


@pytest.mark.parametrize("full", [False, True])
def test_exported_standard_lora_has_the_lorax_delta_w(full: bool) -> None:
    weights = _weights(0)
    cores = _cores(weights, 6, full=full)
    standard = lorax_to_standard(cores, _bases(weights))
    for key, f in standard.items():
        assert f.rank == 6 and f.alpha is None
        assert (f.up.ndim, f.down.ndim) == ((4, 4) if key == "c.weight" else (2, 2))
        want = _delta_w(cores[key], weights[key])
        torch.testing.assert_close(f.up2d() @ f.down2d(), want, rtol=1e-5, atol=1e-5)
    # LoraXDelta.forward patches a weight by exactly that ΔW, in the weight's own shape.
    module = LoraXDelta(top_subspace(weights["c.weight"], 6), (16, 8, 3, 3), full_core=full)
    with torch.no_grad():
        module.core.copy_(cores["c.weight"].core)
    out = module(weights["c.weight"])
    torch.testing.assert_close(
        out - weights["c.weight"], _delta_w(cores["c.weight"], weights["c.weight"]).reshape(16, 8, 3, 3)
    )


def test_compression_keeps_the_largest_deltas_and_states_the_error() -> None:
    weights = _weights(1)
    cores = _cores(weights, 6)
    exact = lorax_to_standard(cores, _bases(weights))
    out = compress_standard(exact, 2)
    for key, f in out.layers.items():
        delta = cores[key].core
        assert f.rank == 2
        # Diagonal core in orthonormal bases: ΔW's singular values are |δ|; Eckart–Young keeps the top 2.
        top = delta.abs().sort(descending=True).values
        want_error = float((top[2:] ** 2).sum().sqrt() / (top**2).sum().sqrt())
        assert out.errors[key] == pytest.approx(want_error, rel=1e-4)
        full = exact[key].up2d() @ exact[key].down2d()
        got = f.up2d() @ f.down2d()
        assert float((full - got).norm() / full.norm()) == pytest.approx(want_error, rel=1e-3)
    assert "rank ≤ 2" in out.summary() and f"{out.max_error:.3g}" in out.summary()
    same = compress_standard(exact, 6)
    assert same.max_error == 0.0 and all(same.layers[k] is exact[k] for k in exact)


def test_compression_rank_below_one_is_refused() -> None:
    with pytest.raises(RankError, match="standard LoRA rank must be ≥ 1"):
        compress_standard({}, 0)


def test_basis_record_accepts_the_same_source_and_a_float16_copy() -> None:
    weights = _weights(2)
    cores = _cores(weights, 6)
    meta = basis_record(cores, _bases(weights), "fp-1")
    assert meta["lorax.rank"] == "6" and meta["lorax.source_fingerprint"] == "fp-1"
    assert set(json.loads(meta[BASIS_KEY])["layers"]) <= set(weights)
    note = check_lorax_source(meta, CORES, Weights(weights, "other"), SubspaceProvider())
    assert note.startswith("LoRA-X bases checked on 3 layers")
    half = {k: w.half() for k, w in weights.items()}
    assert "checked" in check_lorax_source(meta, CORES, Weights(half, "half"), SubspaceProvider())


def test_basis_record_refuses_another_model_and_a_permuted_copy() -> None:
    weights = _weights(3)
    meta = basis_record(_cores(weights, 6), _bases(weights), "fp-src")
    with pytest.raises(
        IncompatibleBaseError,
        match=r"^the source model.s bases of layer .* differ .*"
        r"fingerprint fp-src",
    ):
        check_lorax_source(meta, CORES, Weights(_weights(4), "x"), SubspaceProvider())
    # Same singular values, other bases: output units permuted (a re-parameterised copy).
    perm = {k: w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))] for k, w in weights.items()}
    with pytest.raises(IncompatibleBaseError, match="differ from those the LoRA-X file was trained in"):
        check_lorax_source(meta, CORES, Weights(perm, "p"), SubspaceProvider())


def test_basis_check_refuses_a_missing_layer_and_a_damaged_record() -> None:
    weights = _weights(6)
    meta = basis_record(_cores(weights, 4), _bases(weights), "fp")
    fewer = {k: w for k, w in weights.items() if k != "a.weight"}
    with pytest.raises(IncompatibleBaseError, match=r"layer a\.weight of the LoRA-X file is not in the source model"):
        check_lorax_source(meta, CORES, Weights(fewer, "f"), SubspaceProvider())
    narrow = dict(weights, **{"a.weight": torch.randn(48, 3)})
    with pytest.raises(IncompatibleBaseError, match=r"layer a.weight of the LoRA-X file \(rank 4\) does not fit"):
        check_lorax_source(meta, CORES, Weights(narrow, "n"), SubspaceProvider())
    with pytest.raises(FormatError, match=r"lorax\.basis_check metadata is damaged"):
        check_lorax_source({BASIS_KEY: "{not json"}, CORES, Weights(weights, "w"), SubspaceProvider())
    standard = {"a.weight": lorax_to_standard(CORES, _bases(weights))["a.weight"]}
    assert check_lorax_source(meta, standard, Weights({}, "e"), SubspaceProvider()) == ""
    assert "no lorax.basis_check record" in check_lorax_source({}, CORES, Weights(weights, "w"), SubspaceProvider())


def test_lorax_delta_refuses_a_subspace_of_another_shape() -> None:
    from lorax_core.errors import ShapeMismatchError

    with pytest.raises(ShapeMismatchError, match=r"LoraXDelta: a weight of shape \(16, 8\) flattens"):
        LoraXDelta(top_subspace(torch.randn(16, 9), 4), (16, 8))


def test_lorax_delta_trains_on_a_subspace_made_under_inference_mode() -> None:
    """A cached subspace may come from a node run under inference mode; the core still gets gradients."""
    w = torch.randn(12, 10)
    with torch.inference_mode():
        sub = top_subspace(w, 4)
    module = LoraXDelta(sub, (12, 10))
    module(w).square().sum().backward()
    assert module.core.grad is not None and module.core.grad.shape == (4,)
