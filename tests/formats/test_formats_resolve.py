"""Layer name → model key resolution, with and without ComfyUI's key map."""

from __future__ import annotations

import pytest

from lorax_core.formats.resolve import NEEDS_COMFYUI, layer_name_for, resolve_layers

KEYS = [
    "diffusion_model.input_blocks.1.1.proj_in.weight",
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "diffusion_model.input_blocks.1.1.proj_in.bias",
    "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
]
PROJ_IN = KEYS[0]
TO_Q = KEYS[1]
TE_Q = KEYS[3]


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("diffusion_model.input_blocks.1.1.proj_in", PROJ_IN),  # ComfyUI-native
        ("input_blocks.1.1.proj_in", PROJ_IN),  # bare model path
        ("unet.input_blocks.1.1.proj_in", PROJ_IN),  # PEFT prefix over original layout
        ("base_model.model.input_blocks.1.1.transformer_blocks.0.attn1.to_q", TO_Q),
        ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", TO_Q),  # kohya, dots ↔ underscores
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", TE_Q),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", TE_Q),
        ("lora_te2_text_model_encoder_layers_0_mlp_fc1", KEYS[4]),
        ("text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj", TE_Q),
        ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", TE_Q),
    ],
)
def test_resolves_without_comfyui(name, key):
    assert resolve_layers([name], KEYS) == ({name: key}, {})


def test_diffusers_block_names_point_at_comfyui():
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    resolved, unresolved = resolve_layers([name, "unet.up_blocks.1.attentions.0.proj_out"], KEYS)
    assert resolved == {}
    assert unresolved[name] == NEEDS_COMFYUI
    assert "--comfyui PATH" in NEEDS_COMFYUI
    assert unresolved["unet.up_blocks.1.attentions.0.proj_out"] == NEEDS_COMFYUI


def test_unknown_name_and_duplicates():
    names = ["lora_unet_out_0", "diffusion_model.input_blocks.1.1.proj_in", "lora_unet_input_blocks_1_1_proj_in"]
    resolved, unresolved = resolve_layers(names, KEYS)
    assert resolved == {"diffusion_model.input_blocks.1.1.proj_in": PROJ_IN}
    assert unresolved["lora_unet_out_0"].startswith("no weight of that name in the source model")
    assert unresolved["lora_unet_input_blocks_1_1_proj_in"] == (
        f"patches {PROJ_IN}, which layer diffusion_model.input_blocks.1.1.proj_in already patches; duplicate layer"
    )


def test_ambiguous_kohya_names_are_not_guessed():
    keys = ["diffusion_model.a_b.c.weight", "diffusion_model.a.b_c.weight"]
    resolved, unresolved = resolve_layers(["lora_unet_a_b_c"], keys)
    assert resolved == {}
    assert "ambiguous" in unresolved["lora_unet_a_b_c"]


def test_comfyui_key_map_wins_and_slices_are_reported():
    key_map = {
        "lora_unet_down_blocks_0_attentions_0_proj_in": PROJ_IN,
        "transformer.single_blocks.0.attn.to_q": ("diffusion_model.single_blocks.0.linear1.weight", (0, 0, 64)),
        "lora_unet_gone": "diffusion_model.gone.weight",
    }
    names = [*key_map, "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"]
    resolved, unresolved = resolve_layers(names, KEYS, key_map)
    assert resolved == {
        "lora_unet_down_blocks_0_attentions_0_proj_in": PROJ_IN,
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": TO_Q,  # falls back to our own rules
    }
    # A slice resolves to its own key when the fused weight exists (tests/unit/test_slices.py); here it does not.
    assert unresolved["transformer.single_blocks.0.attn.to_q"] == (
        "ComfyUI maps it to a slice of diffusion_model.single_blocks.0.linear1.weight, which the source model does not have"
    )
    assert unresolved["lora_unet_gone"] == (
        "ComfyUI maps it to diffusion_model.gone.weight, which the source model does not have"
    )


@pytest.mark.parametrize(
    ("fmt", "name"),
    [
        ("kohya", "lora_unet_input_blocks_1_1_proj_in"),
        ("comfy", "diffusion_model.input_blocks.1.1.proj_in"),
        ("peft", "diffusion_model.input_blocks.1.1.proj_in"),
    ],
)
def test_layer_name_for_round_trips_through_resolution(fmt, name):
    assert layer_name_for(PROJ_IN, fmt) == name
    assert resolve_layers([name], KEYS)[0] == {name: PROJ_IN}
