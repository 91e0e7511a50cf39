"""Damaged LyCORIS layers (LoHa, LoKr, Tucker LoCon, DoRA, .diff): one clear reason per layer, never a crash.

Each case is one bad layer next to a good LoRA layer; the file still reads, the good layer is
kept, and the bad one is reported with the reason a person can act on.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorax_core.formats import parse_lora
from lorax_core.formats.keys import LYCORIS_SUFFIXES

GOOD = {"lora_unet_ok.lora_up.weight": torch.ones(8, 2), "lora_unet_ok.lora_down.weight": torch.ones(2, 8)}
L = "lora_unet_bad"
NAN = torch.full((8, 2), float("nan"))


def _hada(**over: torch.Tensor) -> dict[str, torch.Tensor]:
    parts = {
        "hada_w1_a": torch.ones(8, 2),
        "hada_w1_b": torch.ones(2, 6),
        "hada_w2_a": torch.ones(8, 2),
        "hada_w2_b": torch.ones(2, 6),
    }
    parts.update(over)
    return {f"{L}.{k}": v for k, v in parts.items()}


@pytest.mark.parametrize(
    ("tensors", "reason"),
    [
        ({f"{L}.hada_w1_a": torch.ones(8, 2), f"{L}.hada_w1_b": torch.ones(2, 6)}, "incomplete LoHa layer: hada_w2_a, hada_w2_b missing"),
        (_hada(hada_w1_b=torch.ones(3, 6)), "malformed LoHa layer"),
        (_hada(hada_w2_a=torch.ones(7, 2)), "malformed LoHa layer"),
        (_hada(hada_w1_a=NAN), "NaN or Inf values in hada_w1_a"),
        ({**_hada(), f"{L}.hada_t1": torch.ones(2, 2, 3, 3)}, "hada_t1 and hada_t2 must both be present"),
        ({f"{L}.lokr_w1": torch.ones(2, 2)}, "incomplete LoKr layer: neither lokr_w2 nor lokr_w2_a/_b"),
        ({f"{L}.lokr_w1": torch.ones(2, 2), f"{L}.lokr_w2_a": torch.ones(4, 2)}, "incomplete LoKr layer: lokr_w2_b is missing"),
        ({f"{L}.lokr_w1": torch.ones(2, 2), f"{L}.lokr_w2_a": torch.ones(4, 2), f"{L}.lokr_w2_b": torch.ones(3, 4)}, "malformed LoKr layer"),
        ({f"{L}.lokr_w1": torch.ones(2, 2, 1), f"{L}.lokr_w2": torch.ones(4, 4)}, "malformed LoKr layer"),
        ({f"{L}.lokr_w1": torch.ones(2, 2), f"{L}.lokr_w2": torch.full((4, 4), float("inf"))}, "NaN or Inf values in lokr_w2"),
        ({f"{L}.lokr_w1": torch.ones(2, 2), f"{L}.lokr_w2": torch.ones(4, 4), f"{L}.lokr_t2": torch.ones(2, 2, 3, 3)}, "both lokr_w2 and a Tucker core"),
        ({f"{L}.diff_b": torch.ones(8)}, "bias-only patch"),
        ({f"{L}.diff": torch.ones(8)}, "not a linear or conv weight"),
        ({f"{L}.dora_scale": torch.ones(8, 1)}, "without its LoRA factors"),
        ({f"{L}.lora_up.weight": torch.ones(8, 2, 1, 1), f"{L}.lora_down.weight": torch.ones(2, 4, 1, 1), f"{L}.lora_mid.weight": torch.ones(3, 3, 3, 3)}, "malformed Tucker LoCon layer"),
        ({**_hada(), f"{L}.lokr_w1": torch.ones(2, 2)}, "mixes adapter types (LoHa, LoKr)"),
        ({**_hada(), f"{L}.alpha": torch.tensor(float("nan"))}, "alpha is nan"),
    ],
)  # fmt: skip
def test_one_reason_per_damaged_layer(tensors: dict[str, torch.Tensor], reason: str) -> None:
    lora = parse_lora({**GOOD, **tensors})
    assert list(lora.layers) == ["lora_unet_ok"]
    assert list(lora.unsupported) == [L]
    assert reason in lora.unsupported[L]
    assert lora.unsupported[L].endswith(("not transferable", "is missing"))


def test_report_codes_say_damaged_or_unsupported() -> None:
    """Planning codes a damaged LyCORIS layer ``malformed_layer`` and an unreadable type ``unsupported``."""
    from lorax_core.pipeline import plan_transfer
    from lorax_core.types import DictWeights, SkipReason

    good = {
        "diffusion_model.ok.lora_up.weight": torch.ones(8, 2),
        "diffusion_model.ok.lora_down.weight": torch.ones(2, 8),
    }
    bad = {k.replace(L, "diffusion_model.bad"): v for k, v in _hada(hada_w1_a=NAN).items()}
    oft = {"diffusion_model.rot.oft_blocks": torch.ones(2, 4, 4)}
    lora = parse_lora({**good, **bad, **oft})
    plan = plan_transfer(lora, DictWeights({"diffusion_model.ok.weight": torch.ones(8, 8)}))
    assert {name: skip.code for name, skip in plan.skipped.items()} == {
        "diffusion_model.bad": SkipReason.MALFORMED,
        "diffusion_model.rot": SkipReason.UNSUPPORTED,
    }
    assert "NaN or Inf values in hada_w1_a" in str(plan.skipped["diffusion_model.bad"])


_SUFFIXES = (*LYCORIS_SUFFIXES, ".lora_up.weight", ".lora_down.weight", ".alpha")


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.dictionaries(
        st.sampled_from(_SUFFIXES),
        st.lists(st.integers(min_value=0, max_value=4), min_size=0, max_size=4),
        min_size=1,
        max_size=7,
    )
)
def test_any_mix_of_lycoris_tensors_reads_or_says_why(shapes: dict[str, list[int]]) -> None:
    """Random LyCORIS suffix sets and shapes: the layer is read (and its update finite) or reported, never raised."""
    tensors = {f"{L}{suffix}": torch.ones(tuple(shape)) for suffix, shape in shapes.items()}
    lora = parse_lora({**GOOD, **tensors})
    assert "lora_unet_ok" in lora.layers
    if L in lora.layers:
        layer = lora.layers[L]
        assert bool(torch.isfinite(layer.up).all()) and bool(torch.isfinite(layer.down).all())
    else:
        assert lora.unsupported[L]
