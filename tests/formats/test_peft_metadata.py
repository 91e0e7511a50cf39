"""diffusers' ``lora_adapter_metadata`` (scale read and rewritten) and the spellings diffusers/PEFT/transformers 5 give a layer.

Fast and host-free; the same behaviour on files made by the real tools is in test_ecosystem.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lorax_core.formats import parse_lora, read_lora, write_lora
from lorax_core.formats.keys import ADAPTER_METADATA_KEY
from lorax_core.formats.peft import metadata_alphas, rewrite_adapter_metadata
from lorax_core.formats.resolve import NEEDS_COMFYUI, NOT_IN_KEY_MAP, name_spellings, resolve_layers
from lorax_core.types import LoraFactors

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
OUT = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
TE = "encoder.layers.0.self_attn.q_proj"


def _layer(rank: int = 4, out: int = 8, inp: int = 6) -> LoraFactors:
    gen = torch.Generator().manual_seed(rank)
    return LoraFactors(up=torch.randn(out, rank, generator=gen), down=torch.randn(rank, inp, generator=gen))


def _meta(fields: dict[str, object]) -> dict[str, str]:
    return {ADAPTER_METADATA_KEY: json.dumps(fields)}


def test_pipeline_metadata_gives_each_component_its_scale() -> None:
    layers = {f"unet.{Q}": _layer(), f"text_encoder.{TE}": _layer()}
    meta = _meta({"unet.r": 4, "unet.lora_alpha": 2, "text_encoder.r": 4, "text_encoder.lora_alpha": 8})
    alphas = metadata_alphas(layers, meta)
    assert {name: alpha / 4 for name, alpha in alphas.items()} == {f"unet.{Q}": 0.5, f"text_encoder.{TE}": 2.0}


def test_patterns_rslora_and_unprefixed_files() -> None:
    layers = {Q: _layer(8), OUT: _layer(4)}
    meta = _meta({"r": 4, "lora_alpha": 4, "rank_pattern": {"attn1.to_q": 8}, "alpha_pattern": {"attn1.to_q": 2}})
    alphas = metadata_alphas(layers, meta)
    assert alphas[Q] / 8 == pytest.approx(2 / 8) and alphas[OUT] / 4 == pytest.approx(1.0)
    rs = metadata_alphas({Q: _layer(4)}, _meta({"r": 4, "lora_alpha": 4, "use_rslora": True}))
    assert rs[Q] / 4 == pytest.approx(4 / math.sqrt(4))


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", json.dumps({"r": 0, "lora_alpha": 4}), json.dumps({"r": 4})])
def test_unusable_metadata_leaves_scale_one(raw: str) -> None:
    assert metadata_alphas({Q: _layer()}, {ADAPTER_METADATA_KEY: raw}) == {}


def test_parse_applies_metadata_to_peft_layers_without_alpha_only() -> None:
    f = _layer()
    tensors = {
        f"unet.{Q}.lora_A.weight": f.down, f"unet.{Q}.lora_B.weight": f.up,
        f"unet.{OUT}.lora_A.weight": f.down, f"unet.{OUT}.lora_B.weight": f.up, f"unet.{OUT}.alpha": torch.tensor(4.0),
    }  # fmt: skip
    lora = parse_lora(tensors, _meta({"unet.r": 4, "unet.lora_alpha": 2}))
    assert lora.layers[f"unet.{Q}"].scale == pytest.approx(0.5)
    assert lora.layers[f"unet.{OUT}"].scale == pytest.approx(1.0)  # its own .alpha tensor wins


def test_rewrite_describes_the_written_ranks() -> None:
    source = {
        "unet.r": 16,
        "unet.lora_alpha": 8,
        "unet.lora_dropout": 0.1,
        "unet.layers_to_transform": [0],
        "format": 1,
    }
    meta = rewrite_adapter_metadata(
        _meta(source) | {"ss_tag": "x"}, {f"unet.{Q}": 8, f"unet.{OUT}": 8, "unet.mid.proj": 4}, has_alpha_layers=False
    )
    fields = json.loads(meta[ADAPTER_METADATA_KEY])
    assert meta["ss_tag"] == "x"
    assert (fields["unet.r"], fields["unet.lora_alpha"], fields["unet.use_rslora"]) == (8, 8, False)
    assert fields["unet.rank_pattern"] == fields["unet.alpha_pattern"] == {"mid.proj": 4}
    assert fields["unet.target_modules"] == sorted([Q, OUT, "mid.proj"])
    assert fields["unet.lora_dropout"] == 0.1 and fields["unet.layers_to_transform"] is None
    assert rewrite_adapter_metadata(_meta(source), {f"unet.{Q}": 8}, has_alpha_layers=True) == {}
    assert rewrite_adapter_metadata({"a": "b"}, {f"unet.{Q}": 8}, has_alpha_layers=False) == {"a": "b"}


def test_write_then_read_keeps_the_scale(tmp_path: Path) -> None:
    f = _layer()
    tensors = {f"unet.{Q}.lora_A.weight": f.down, f"unet.{Q}.lora_B.weight": f.up}
    src = parse_lora(tensors, _meta({"unet.r": 4, "unet.lora_alpha": 2}))
    small = LoraFactors(up=f.up[:, :2], down=f.down[:2], alpha=1.0)  # rank 2, scale 0.5
    path = write_lora(tmp_path / "o.safetensors", {f"unet.{Q}": small}, style=src, metadata=src.metadata)
    back = read_lora(path)
    fields = json.loads(back.metadata[ADAPTER_METADATA_KEY])
    assert (fields["unet.r"], fields["unet.lora_alpha"]) == (2, 2)
    got = back.layers[f"unet.{Q}"]
    assert torch.allclose(got.scale * got.up @ got.down, small.scale * small.up @ small.down, atol=1e-6)


def test_spellings() -> None:
    assert name_spellings(f"unet.{Q}") == [f"unet.{Q}", f"unet.{Q[: -len('.to_q')]}.processor.to_q"]
    assert name_spellings(f"unet.{OUT}")[-1] == f"unet.{OUT[: -len('.to_out.0')]}.processor.to_out"
    assert f"unet.{Q}" in name_spellings(f"unet.base_model.model.{Q}")
    assert Q in name_spellings(f"base_model.model.{Q}")
    assert name_spellings(f"text_encoder.{TE}")[1] == f"text_encoder.text_model.{TE}"
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1" in name_spellings("lora_te1_encoder_layers_0_mlp_fc1")
    assert name_spellings("lora_unet_input_blocks_1_1_proj_in") == ["lora_unet_input_blocks_1_1_proj_in"]


def test_key_map_is_searched_in_every_spelling() -> None:
    model_key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    processor = f"{Q[: -len('.to_q')]}.processor.to_q"
    key_map = {processor: model_key, f"unet.{processor}": model_key}  # ComfyUI lists both prefixes
    for name in (f"unet.{Q}", f"base_model.model.{Q}", f"unet.base_model.model.{Q}"):
        assert resolve_layers([name], [model_key], key_map) == ({name: model_key}, {})


def test_transformers5_text_encoder_names_resolve_without_comfyui() -> None:
    key = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    for name in (f"text_encoder.{TE}", "lora_te1_encoder_layers_0_self_attn_q_proj"):
        assert resolve_layers([name], [key]) == ({name: key}, {})


def test_a_name_the_key_map_lacks_does_not_point_at_comfyui() -> None:
    name = "unet.down_blocks.9.attentions.0.proj_in"
    assert resolve_layers([name], ["diffusion_model.x.weight"], {})[1] == {name: NOT_IN_KEY_MAP}
    assert resolve_layers([name], ["diffusion_model.x.weight"])[1] == {name: NEEDS_COMFYUI}
    assert "--comfyui" not in NOT_IN_KEY_MAP
