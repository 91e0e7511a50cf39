"""Class 3 of issue 11: impossible factor shapes are reported per layer; a 3-D base weight is named.

Rank-0 layers, a 4-D ``(out, r, 3, 3)`` up on a linear layer and a 0-d LoRA-X core used to
crash the reader or the transfer; a 3-D source weight stopped the whole run with a message that
named neither file nor layer.
"""

from __future__ import annotations

import re

import pytest
import torch
from _badinput_helpers import KOHYA
from make_fixtures import Files, kohya_lora, one_error_line, sd_checkpoint, transfer_argv
from safetensors.torch import save_file

from lorax_core.cli import main
from lorax_core.errors import ShapeMismatchError
from lorax_core.formats import parse_lora
from lorax_core.library import EXIT_PARTIAL
from lorax_core.transfer import transfer_adapter
from lorax_core.types import DictWeights, LoraFactors, SkipReason, TransferOptions

GOOD = {"lora_unet_ok.lora_up.weight": torch.ones(8, 2), "lora_unet_ok.lora_down.weight": torch.ones(2, 8)}


@pytest.mark.parametrize(
    ("tensors", "reason"),
    [
        ({f"{KOHYA}.lora_up.weight": torch.ones(8, 0), f"{KOHYA}.lora_down.weight": torch.ones(0, 8)},
         "rank-0 LoRA layer (its factors have no columns: it changes nothing)"),
        ({f"{KOHYA}.lora_up.weight": torch.ones(8, 2, 3, 3), f"{KOHYA}.lora_down.weight": torch.ones(2, 8)},
         "LoRA up of shape (8, 2, 3, 3) is not (out, r) or (out, r, 1, 1); the kernel of a conv LoRA belongs in down."),
        ({f"{KOHYA}.lora_up.weight": torch.ones(8, 2, 2), f"{KOHYA}.lora_down.weight": torch.ones(2, 8)},
         "LoRA factors must be 2-D (linear) or 4-D (conv); got up (8, 2, 2)"),
        ({"a.lorax_core": torch.tensor(1.0), "a.lorax_shape": torch.tensor([8, 8])},
         ".lorax_core must be a vector (R,) or a square matrix (R, R); got shape ()"),
        ({"a.lorax_core": torch.ones(0), "a.lorax_shape": torch.tensor([8, 8])},
         "rank-0 LoRA-X layer (an empty core: it changes nothing)"),
        ({"a.lorax_core": torch.ones(2, 3), "a.lorax_shape": torch.tensor([8, 8])},
         ".lorax_core must be a vector (R,) or a square matrix (R, R); got shape (2, 3)"),
    ],
    ids=["rank-0", "4d-up-on-linear", "3d-up", "0d-lorax-core", "empty-lorax-core", "non-square-core"],
)  # fmt: skip
def test_impossible_factor_shapes_are_per_layer_skips(tensors, reason) -> None:
    lora = parse_lora({**tensors, **GOOD})
    assert list(lora.layers) == ["lora_unet_ok"]
    (got,) = lora.unsupported.values()
    assert got.startswith(reason), got


def test_4d_up_is_refused_by_the_factors_type() -> None:
    with pytest.raises(ShapeMismatchError, match=re.escape("LoRA up of shape (8, 2, 3, 3) is not (out, r)")):
        LoraFactors(up=torch.ones(8, 2, 3, 3), down=torch.ones(2, 8))


def _files_with_3d_source(tmp, *, all_layers: bool) -> Files:
    source = sd_checkpoint(0)
    keys = [k for k in source if k.startswith("model.diffusion_model.") and k.endswith(".weight")]
    for key in keys if all_layers else keys[:1]:
        w = source[key]
        source[key] = w.reshape(w.shape[0], w.shape[1], -1)  # 3-D: (out, in, kh·kw) or (out, in, 1)
    save_file(source, str(tmp / "source.safetensors"))
    save_file(sd_checkpoint(7), str(tmp / "target.safetensors"))
    save_file(kohya_lora(text_encoder=False), str(tmp / "lora.safetensors"))
    return Files(tmp, tmp / "source.safetensors", tmp / "target.safetensors", tmp / "lora.safetensors")


def test_3d_source_weights_name_the_file_and_the_layer(tmp_path, capsys) -> None:
    files = _files_with_3d_source(tmp_path, all_layers=True)
    assert main(transfer_argv(files)) == 2
    line = one_error_line(capsys)
    assert re.match(
        re.escape(f"lorax_core transfer: error: {files.lora}: no layer fits {files.source} (8 shape mismatches, e.g. ")
        + r"lora_unet_\w+: the source weight is 3-D \(\d+×\d+×\d+\); only linear \(out, in\) and conv",
        line,
    ), line


def test_one_3d_source_weight_is_a_reported_skip(tmp_path, capsys) -> None:
    files = _files_with_3d_source(tmp_path, all_layers=False)
    report = tmp_path / "report.json"
    # A partial transfer: the output is written and the exit status says some layers were skipped.
    assert main(transfer_argv(files, "out.safetensors", report=report, threshold=0.0)) == EXIT_PARTIAL
    text = report.read_text()
    assert "the source weight is 3-D" in text
    assert (tmp_path / "out.safetensors").is_file()


def test_transfer_core_skips_a_3d_base_weight_per_layer() -> None:
    """Hosts that resolve layers themselves (the nodes) rely on the core's own check."""
    w = torch.randn(8, 8)
    layer = LoraFactors(up=torch.randn(8, 2), down=torch.randn(2, 8))
    source = DictWeights({"a": w.reshape(8, 8, 1), "b": w})
    target = DictWeights({"a": w.reshape(8, 8, 1), "b": w})
    result = transfer_adapter({"a": layer, "b": layer}, source, target, TransferOptions(rank=4))
    a, b = result.report.layers
    assert (a.status, a.reason, b.status) == ("skipped", SkipReason.WEIGHT_NDIM.text, "transferred")
