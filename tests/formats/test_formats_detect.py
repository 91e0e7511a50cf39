"""Golden files are detected correctly; unsupported layer types are reported, never dropped."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from lorax_core.errors import FormatError
from lorax_core.formats import parse_lora, read_keys, read_lora
from lorax_core.formats.family import guess_family
from lorax_core.types import LoraFactors, LoraXFactors

GOLDEN = [
    # file, format, transferable layers, unsupported layers, family guess
    ("kohya_sd15.safetensors", "kohya", 4, 0, "sd15"),
    ("kohya_sdxl_noalpha.safetensors", "kohya", 3, 0, "sdxl"),
    ("comfy_native.safetensors", "comfy", 3, 0, "unknown"),
    ("diffusers_peft.safetensors", "peft", 2, 0, "unknown"),
    ("peft_default_adapter.safetensors", "peft", 1, 0, "flux"),
    ("lycoris_mixed.safetensors", "kohya", 6, 0, "unknown"),
    ("lorax_core.safetensors", "lorax", 2, 0, "unknown"),
]


@pytest.mark.parametrize(("name", "fmt", "n_layers", "n_unsupported", "family"), GOLDEN)
def test_golden_files_are_detected(golden, name, fmt, n_layers, n_unsupported, family):
    lora = read_lora(golden / name)
    _, shapes, metadata = read_keys(golden / name)

    assert lora.format == fmt
    assert len(lora.layers) == n_layers
    assert len(lora.unsupported) == n_unsupported
    assert guess_family(shapes, metadata) == family


def test_golden_kohya_layers_keep_file_dtype_alpha_and_conv_layout(golden):
    lora = read_lora(golden / "kohya_sd15.safetensors")
    conv = lora.layers["lora_unet_input_blocks_1_0_in_layers_2"]
    assert isinstance(conv, LoraFactors)
    assert conv.up.dtype == torch.float16
    assert conv.alpha == 1.0
    assert conv.kernel == (8, 3, 3)
    assert tuple(conv.up.shape) == (16, 2, 1, 1)
    assert lora.metadata["ss_base_model_version"] == "sd_v1"


def test_golden_lycoris_layers_are_read_by_type(golden):
    """A mixed file (LoRA, LoHa, LoKr, DoRA, Tucker LoCon, .diff) is read layer by layer, each in its own type."""
    from lorax_core.lycoris import LycorisLayer

    lora = read_lora(golden / "lycoris_mixed.safetensors")
    assert lora.unsupported == {}
    kinds = {name: getattr(layer, "kind", "plain") for name, layer in lora.layers.items()}
    assert kinds == {
        "lora_unet_middle_block_1_proj_out": "plain",
        "lora_unet_middle_block_1_proj_in": "loha",
        "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q": "lokr",
        "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_k": "lora",
        "lora_unet_middle_block_0_in_layers_2": "plain",
        "lora_unet_out_2": "full",
    }
    tucker = lora.layers["lora_unet_middle_block_0_in_layers_2"]
    assert not isinstance(tucker, LycorisLayer) and (tucker.out_features, tucker.in_features) == (16, 8 * 9)
    lokr = lora.layers["lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q"]
    assert (lokr.out_features, lokr.in_features) == (16, 16)


def test_golden_lorax_cores(golden):
    lora = read_lora(golden / "lorax_core.safetensors")
    diag = lora.layers["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"]
    full = lora.layers["diffusion_model.input_blocks.1.0.in_layers.2"]
    assert isinstance(diag, LoraXFactors) and diag.core.shape == (8,) and diag.shape == (16, 16)
    assert isinstance(full, LoraXFactors) and full.core.shape == (4, 4) and full.shape == (16, 8, 3, 3)


def test_golden_peft_default_adapter_style(golden):
    lora = read_lora(golden / "peft_default_adapter.safetensors")
    (name,) = lora.layers
    assert name == "base_model.model.transformer_blocks.0.attn.to_q"
    assert lora.styles[name].down == ".lora_A.default.weight"


def test_unknown_keys_raise_listing_formats_and_keys():
    tensors = {"model.layer.weight": torch.zeros(2, 2), "model.layer.bias": torch.zeros(2)}
    msg = "x.safetensors: not a LoRA file in any format we read (tried lorax, kohya, comfy, peft); some keys: "
    with pytest.raises(FormatError, match=re.escape(msg + "model.layer.bias, model.layer.weight")):
        parse_lora(tensors, source="x.safetensors")


def test_model_file_passed_as_lora_is_a_format_error(tmp_path):
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(FormatError, match=r"not a LoRA file in any format we read"):
        read_lora(tmp_path / "m.safetensors")


def test_unrecognised_keys_beside_lora_layers_are_reported():
    tensors = {
        "lora_unet_a.lora_down.weight": torch.zeros(2, 4),
        "lora_unet_a.lora_up.weight": torch.zeros(4, 2),
        "lora_unet_b.alpha": torch.tensor(1.0),
        "lora_unet_c.lora_down.weight": torch.zeros(2, 4),
        "emb_params": torch.zeros(3),
    }
    lora = parse_lora(tensors)
    assert list(lora.layers) == ["lora_unet_a"]
    assert lora.unsupported["emb_params"].startswith("unrecognised tensor key")
    assert lora.unsupported["lora_unet_b"] == "no up/down factors (found only .alpha); not a LoRA layer"
    assert lora.unsupported["lora_unet_c"] == "incomplete LoRA layer: .lora_up.weight is missing"


def test_rank_mismatch_and_integer_factors_are_reported_not_raised():
    tensors = {
        "lora_unet_a.lora_down.weight": torch.zeros(3, 4),
        "lora_unet_a.lora_up.weight": torch.zeros(4, 2),
        "lora_unet_b.lora_down.weight": torch.zeros(2, 4, dtype=torch.int32),
        "lora_unet_b.lora_up.weight": torch.zeros(4, 2, dtype=torch.int32),
        "lora_unet_c.lora_down.weight": torch.zeros(2, 4),
        "lora_unet_c.lora_up.weight": torch.zeros(4, 2),
    }
    lora = parse_lora(tensors)
    assert list(lora.layers) == ["lora_unet_c"]
    assert "LoRA rank mismatch" in lora.unsupported["lora_unet_a"]
    assert lora.unsupported["lora_unet_b"] == "LoRA factors must be floating point; got torch.int32 and torch.int32"


def test_mixed_key_styles_in_one_file_keep_their_own_style():
    tensors = {
        "lora_unet_a.lora_down.weight": torch.zeros(2, 4),
        "lora_unet_a.lora_up.weight": torch.zeros(4, 2),
        "lora_unet_b.lora_down.weight": torch.zeros(2, 4),
        "lora_unet_b.lora_up.weight": torch.zeros(4, 2),
        "text_encoder.x.lora_A.weight": torch.zeros(2, 4),
        "text_encoder.x.lora_B.weight": torch.zeros(4, 2),
    }
    lora = parse_lora(tensors)
    assert lora.format == "kohya"
    assert lora.layer_formats == {"lora_unet_a": "kohya", "lora_unet_b": "kohya", "text_encoder.x": "peft"}
    assert lora.styles["text_encoder.x"].up == ".lora_B.weight"


def test_lorax_layer_problems_are_reported():
    tensors = {
        "a.lorax_core": torch.zeros(4),
        "b.lorax_core": torch.zeros(4),
        "b.lorax_shape": torch.tensor([2, 2]),
        "c.lorax_core": torch.zeros(2),
        "c.lorax_shape": torch.tensor([4.0, 4.0]),
    }
    lora = parse_lora(tensors)
    assert lora.layers == {}
    assert (
        lora.unsupported["a"] == "LoRA-X layer without .lorax_shape (the base weight's shape); the file is incomplete"
    )
    assert lora.unsupported["b"] == "LoRA-X rank 4 does not fit a base weight of shape (2, 2)"
    assert lora.unsupported["c"].startswith(".lorax_shape must be 2 or 4 integers")


@pytest.mark.parametrize(
    ("shapes", "metadata", "family"),
    [
        ({}, {"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
        ({}, {"modelspec.architecture": "stable-diffusion-v1/lora"}, "sd15"),
        ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (9, 3)}, {}, "flux"),
        ({"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 1024)}, {}, "sd2"),
        (
            {"lora_unet_x_attn2_to_k.lora_down.weight": (4, 768), "lora_unet_x_attn2_to_k.lora_up.weight": (320, 4)},
            {},
            "sd15",
        ),
        ({"a.weight": (3, 3)}, {}, "unknown"),
    ],
)
def test_family_guess(shapes, metadata, family):
    assert guess_family(shapes, metadata) == family
