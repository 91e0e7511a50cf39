"""Class 2 of issue 11: NaN, Inf and overflowing values are reported per layer and never written.

Decisions (docs/FORMATS.md "Non-finite numbers"): a LoRA layer whose factors or alpha hold
NaN/Inf is *skipped* with a reason (one damaged layer does not stop the file); a base weight
with NaN/Inf skips the layers that need it; maths that overflows float32 skips the layer; a
scale that overflows float16 when folded stays in ``alpha`` (or, in PEFT style, the layer is
written in float32); and every write refuses a non-finite tensor as the last line of defence.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from _badinput_helpers import CHECKPOINT_KEY, KOHYA
from make_fixtures import Files, kohya_lora, one_error_line, sd_checkpoint, transfer_argv
from safetensors import safe_open
from safetensors.torch import save_file

from lorax_core.cli import main
from lorax_core.errors import NonFiniteError
from lorax_core.formats import parse_lora, read_lora
from lorax_core.formats.base import pair_tensors
from lorax_core.formats.io import save_tensors
from lorax_core.formats.keys import KOHYA_STYLE, PEFT_STYLE
from lorax_core.library import EXIT_PARTIAL
from lorax_core.linalg import recompress, top_subspace
from lorax_core.transfer import transfer_adapter
from lorax_core.types import DictWeights, LayerReport, LoraFactors, SkipReason, TransferOptions, TransferReport

KEY = "diffusion_model.a.weight"


def _pair(up: torch.Tensor, down: torch.Tensor, alpha: float | None = None) -> dict[str, torch.Tensor]:
    tensors = {f"{KOHYA}.lora_up.weight": up, f"{KOHYA}.lora_down.weight": down}
    if alpha is not None:
        tensors[f"{KOHYA}.alpha"] = torch.tensor(alpha)
    return tensors


@pytest.mark.parametrize(
    ("tensors", "reason"),
    [
        (_pair(torch.full((8, 2), math.nan), torch.ones(2, 8)), "NaN or Inf values in lora_up.weight (the file is damaged)"),
        (_pair(torch.ones(8, 2), torch.full((2, 8), math.inf)), "NaN or Inf values in lora_down.weight (the file is damaged)"),
        (_pair(torch.ones(8, 2), torch.ones(2, 8), math.nan), "alpha is nan (NaN or Inf: the file is damaged)"),
        (_pair(torch.ones(8, 2), torch.ones(2, 8), -math.inf), "alpha is -inf (NaN or Inf: the file is damaged)"),
        ({"a.lorax_core": torch.tensor([1.0, math.nan]), "a.lorax_shape": torch.tensor([8, 8])},
         "NaN or Inf values in lorax_core (the file is damaged)"),
    ],
    ids=["nan-up", "inf-down", "nan-alpha", "inf-alpha", "nan-lorax-core"],
)  # fmt: skip
def test_non_finite_lora_layer_is_skipped_with_its_reason(tensors, reason) -> None:
    good = {"lora_unet_ok.lora_up.weight": torch.ones(8, 2), "lora_unet_ok.lora_down.weight": torch.ones(2, 8)}
    lora = parse_lora({**tensors, **good})
    assert list(lora.layers) == ["lora_unet_ok"]
    (got,) = lora.unsupported.values()
    assert got.startswith(reason)


def _cli_files(tmp: Path, *, lora: dict[str, torch.Tensor] | None = None, nan_target: bool = False) -> Files:
    source = sd_checkpoint(0)
    target = sd_checkpoint(7, related_to=source, noise=0.02)
    if nan_target:
        target = {k: v.clone() for k, v in target.items()}
        for k, v in target.items():
            if k.startswith("model.diffusion_model.") and k.endswith(".weight"):
                v.view(-1)[0] = math.nan
    save_file(source, str(tmp / "source.safetensors"))
    save_file(target, str(tmp / "target.safetensors"))
    save_file(lora if lora is not None else kohya_lora(text_encoder=False), str(tmp / "lora.safetensors"))
    return Files(tmp, tmp / "source.safetensors", tmp / "target.safetensors", tmp / "lora.safetensors")


@pytest.mark.parametrize("force", [False, True])
def test_nan_in_target_weights_skips_layers_for_that_reason_even_with_force(tmp_path, capsys, force) -> None:
    """Φ of a NaN weight used to read 1.000 (min(1.0, nan)); now the layer is skipped for the true reason."""
    files = _cli_files(tmp_path, nan_target=True)
    argv = transfer_argv(files, "out.safetensors", *(["--force"] if force else []))
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert line.startswith(
        f"lorax_core transfer: error: none of the 8 layers was transferred; most common reason (8 layers): "
        f"{SkipReason.NONFINITE_WEIGHT.text}. Fix: re-download the source and target models"
    ), line
    assert not (tmp_path / "out.safetensors").exists()


def test_nan_weight_names_file_and_tensor(tmp_path) -> None:
    files = _cli_files(tmp_path, nan_target=True)
    from lorax_core.modelio import open_model

    with pytest.raises(
        NonFiniteError, match=re.escape(f"{files.target}: weight {CHECKPOINT_KEY!r} holds 1 NaN or Inf")
    ):
        open_model(files.target).get(f"diffusion_model.{CHECKPOINT_KEY.removeprefix('model.diffusion_model.')}")


def test_top_subspace_refuses_non_finite_weights() -> None:
    w = torch.ones(4, 4)
    w[1, 2] = math.inf
    with pytest.raises(NonFiniteError, match=re.escape("base weight of shape (4, 4) holds 1 NaN or Inf values")):
        top_subspace(w, 2)


@pytest.mark.parametrize("method", ["auto", "copy", "exact", "prolora", "project"])
def test_huge_factors_are_skipped_not_crashed_or_copied(tmp_path, capsys, method) -> None:
    """1e30 factors overflow float32 (ΔW ~ 1e60): the default methods crashed in recompress, copy wrote them."""
    lora = kohya_lora(text_encoder=False)
    lora = {k: (v * 1e31 if k.endswith((".lora_up.weight", ".lora_down.weight")) else v) for k, v in lora.items()}
    files = _cli_files(tmp_path, lora=lora)
    assert main(transfer_argv(files, "out.safetensors", method=method)) == 2
    line = one_error_line(capsys)
    assert line.startswith(
        f"lorax_core transfer: error: none of the 8 layers was transferred; most common reason (8 layers): "
        f"{SkipReason.OVERFLOW.text}. Fix: check the LoRA file"
    ), line
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "lora.safetensors",
        "source.safetensors",
        "target.safetensors",
    ]


def test_recompress_refuses_non_finite_factors() -> None:
    with pytest.raises(NonFiniteError, match=re.escape("scaling a layer's factors overflowed float32")):
        recompress(torch.full((4, 2), math.inf), torch.ones(2, 4), None)


def test_float16_overflow_after_transfer_stays_float32_and_says_so() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 16, generator=gen)
    up = (torch.randn(16, 2, generator=gen) * 100).to(torch.float16)
    down = (torch.randn(2, 16, generator=gen) * 100).to(torch.float16)
    layer = LoraFactors(up=up, down=down, alpha=2e7)  # scale 1e7: √s of ΔW is far beyond float16's 65504
    result = transfer_adapter({KEY: layer}, DictWeights({KEY: w}), DictWeights({KEY: w}), TransferOptions(rank=4))
    out = result.layers[KEY]
    assert out.up.dtype == torch.float32 and bool(torch.isfinite(out.up).all())
    assert "kept in float32: the update overflows torch.float16" in result.report.layers[0].reason


def test_folding_alpha_into_float16_keeps_the_scale_in_alpha_or_writes_float32() -> None:
    up, down = torch.full((8, 2), 1000.0, dtype=torch.float16), torch.ones(2, 8, dtype=torch.float16)
    layer = LoraFactors(up=up, down=down, alpha=2000.0)  # scale 1000 → up 1e6 overflows float16
    kohya = pair_tensors("l", layer, KOHYA_STYLE)
    assert torch.equal(kohya["l.lora_up.weight"], up) and float(kohya["l.alpha"]) == 2000.0
    peft = pair_tensors("l", layer, PEFT_STYLE)
    assert peft["l.lora_B.weight"].dtype == torch.float32 and float(peft["l.lora_B.weight"][0, 0]) == 1e6
    for tensors in (kohya, peft):
        assert all(bool(torch.isfinite(t.float()).all()) for t in tensors.values())


def test_folded_scale_beyond_float32_is_refused() -> None:
    layer = LoraFactors(up=torch.full((8, 2), 1e30), down=torch.ones(2, 8), alpha=2e30)
    with pytest.raises(NonFiniteError, match=re.escape("layer 'l': alpha/rank = 1e+30 times up overflows float32")):
        pair_tensors("l", layer, KOHYA_STYLE)


def test_no_write_holds_a_non_finite_value(tmp_path) -> None:
    out = tmp_path / "o.safetensors"
    with pytest.raises(
        NonFiniteError, match=re.escape(f"{out}: refusing to write tensor 'a': 1 of its 3 values are NaN")
    ):
        save_tensors(out, {"a": torch.tensor([1.0, math.nan, 2.0])})
    assert list(tmp_path.iterdir()) == []


def test_report_json_writes_non_finite_numbers_as_null() -> None:
    report = TransferReport(layers=[LayerReport(key="a", status="skipped", reason="r", method="auto",
                                                phi_left=math.nan, norm_source=math.inf)])  # fmt: skip
    text = report.to_json()
    assert "NaN" not in text and "Infinity" not in text
    layer = json.loads(text)["layers"][0]
    assert layer["phi_left"] is None and layer["norm_source"] is None


def test_lora_with_one_nan_layer_still_transfers_the_rest(tmp_path, capsys) -> None:
    lora = kohya_lora(text_encoder=False)
    bad = next(k for k in lora if k.endswith(".lora_up.weight"))
    lora[bad] = lora[bad].clone()
    lora[bad].view(-1)[0] = math.nan
    files = _cli_files(tmp_path, lora=lora)
    report = tmp_path / "report.json"
    assert main(transfer_argv(files, "out.safetensors", report=report)) == EXIT_PARTIAL  # one layer skipped
    layers = json.loads(report.read_text(), parse_constant=float)["layers"]
    skipped = [r for r in layers if r["status"] == "skipped"]
    assert len(skipped) == 1 and skipped[0]["reason"].startswith("NaN or Inf values in lora_up.weight")
    assert len(read_lora(tmp_path / "out.safetensors").layers) == 7
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as handle:
        assert all(bool(torch.isfinite(handle.get_tensor(k)).all()) for k in handle.keys())
