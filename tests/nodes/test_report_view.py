"""The report view's data (nodes/_ui.py): verdict, grouping by block, skipped first, strict JSON.

The browser tier (tests/integration/test_browser.py) checks that web/js/lorax.js draws it.
"""

from __future__ import annotations

import json
import math

import pytest
from comfy_harness import pack_module

pytestmark = pytest.mark.comfy


def _ui():
    return pack_module("nodes._ui")


@pytest.mark.parametrize(("name", "place"), [
    ("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", ("input", 4)),
    ("diffusion_model.middle_block.1.proj_in.weight", ("middle", -1)),
    ("diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.2.weight", ("output", 11)),
    ("lora_unet_input_blocks_7_1_transformer_blocks_3_attn2_to_k", ("input", 7)),
    ("lora_unet_down_blocks_1_attentions_0_proj_in", ("input", 1)),
    ("unet.up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_v", ("output", 2)),
    ("lora_unet_mid_block_attentions_0_proj_out", ("middle", -1)),
    ("text_encoders.clip_l.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight", ("text encoder", 3)),
    ("text_encoders.clip_g.transformer.text_model.encoder.layers.30.mlp.fc1.weight", ("text encoder 2", 30)),
    ("lora_te2_text_model_encoder_layers_5_self_attn_k_proj", ("text encoder 2", 5)),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", ("text encoder", 0)),
    ("diffusion_model.double_blocks.7.img_attn.qkv.weight[0:3072]", ("double", 7)),
    ("transformer.single_transformer_blocks.12.attn.to_q", ("single", 12)),
    ("lora_unet_single_blocks_3_linear1", ("single", 3)),
    ("diffusion_model.joint_blocks.2.x_block.attn.qkv.weight", ("joint", 2)),
    ("diffusion_model.blocks.9.self_attn.q.weight", ("blocks", 9)),
    ("something_else", ("other", -1)),
])  # fmt: skip
def test_layers_are_placed_the_way_the_model_is_built(name, place) -> None:
    assert _ui().layer_place(name) == place


def _report():
    types = pack_module("lorax_core.types")
    key = "diffusion_model.input_blocks.{}.1.transformer_blocks.0.attn1.to_q.weight"
    layers = [types.LayerReport(key=f"lora_unet_input_blocks_{i}_1_to_q", status="transferred", reason="",
                                method="exact", target_key=key.format(i), phi_left=0.95, phi_right=0.96,
                                chance=0.25, threshold=0.625, energy_kept=1.0, output_rank=8) for i in range(58)]
    layers.insert(10, types.LayerReport(key="lora_unet_middle_block_1_attn2_to_k", status="skipped",
                                        reason="width mismatch between source and target layer (cannot …)",
                                        method="auto", code="width", phi_left=float("nan")))
    layers.append(types.LayerReport(key="lora_te1_text_model_encoder_layers_0_mlp_fc1", status="skipped",
                                    reason="width mismatch between source and target layer (cannot …)",
                                    method="auto", code="width"))
    return types.TransferReport(layers=layers)


def test_transfer_view_has_the_verdict_and_lists_skipped_layers_first() -> None:
    view = _ui().transfer_view(_report(), "style.safetensors: SD15 → SD15")
    assert view["verdict"] == "58 of 60 layers transferred · 2 skipped: width mismatch · mean Φ 0.95"
    columns = view["columns"]
    rows = [dict(zip(columns, row, strict=True)) for row in view["layers"]]
    assert [r["outcome"] for r in rows[:2]] == ["skip:width", "skip:width"]
    assert {r["outcome"] for r in rows[2:]} == {"exact"}
    assert (rows[0]["section"], rows[1]["section"]) == ("middle", "text encoder")
    assert rows[2]["phi"] == 0.95 and rows[2]["phi_right"] == 0.96 and rows[2]["output_rank"] == 8
    assert rows[0]["phi"] is None and rows[0]["phi_left"] is None  # NaN is never sent
    assert view["labels"] == {"skip:width": "width mismatch"}
    json.dumps(view, allow_nan=False)  # strict JSON: the browser parses it


def test_every_skip_reason_has_words_in_the_verdict() -> None:
    reasons = pack_module("lorax_core.types").SkipReason
    assert set(_ui().SKIP_LABELS) == set(reasons)
    # An unresolved layer says what kind (its reason's first clause), e.g. a text-encoder layer without CLIP.
    label = _ui().skip_label("host_rule", "text-encoder layer: connect the target model's CLIP to the node")
    assert label == "text-encoder layer"


def test_similarity_view_puts_failing_and_uncompared_pairs_first() -> None:
    sim = pack_module("lorax_core.similarity")
    key = "diffusion_model.output_blocks.{}.1.proj_in.weight"
    entries = [sim.LayerSimilarity(key.format(i), key.format(i), 0.9, 0.92, 0.1, 32, 0.55, True) for i in range(5)]
    entries.append(sim.LayerSimilarity(key.format(7), key.format(7), 0.3, 0.5, 0.1, 32, 0.55, False))
    entries.append(sim.LayerSimilarity(key.format(8), key.format(8), None, None, None, None, None, False,
                                       "widths differ"))
    view = _ui().similarity_view(sim.SimilarityTable(entries), "a → b")
    assert view["verdict"] == "5 of 7 layer pairs pass · 1 below threshold · 1 not compared · mean Φ 0.80"
    outcomes = [row[3] for row in view["layers"]]
    assert outcomes[:2] == ["fail", "n/a"] and set(outcomes[2:]) == {"pass"}
    assert not any(isinstance(v, float) and not math.isfinite(v) for row in view["layers"] for v in row)
