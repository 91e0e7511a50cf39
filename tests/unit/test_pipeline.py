"""The steps the CLI and the nodes share (``lorax_core.pipeline``): plan, names, metadata."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lorax_core.errors import NothingTransferableError, ShapeMismatchError
from lorax_core.formats import LoraFile
from lorax_core.modelio import open_model
from lorax_core.pipeline import ModelInfo, output_metadata, output_names, plan_transfer
from lorax_core.transfer import transfer_adapter
from lorax_core.types import DictWeights, LoraFactors, TransferOptions, shape_problem

KEY = "diffusion_model.blocks.0.attn.to_q.weight"
QKV = "diffusion_model.blocks.0.attn.qkv.weight"


def _factors(out: int, inp: int, rank: int = 2) -> LoraFactors:
    gen = torch.Generator().manual_seed(out * 1000 + inp)
    return LoraFactors(up=torch.randn(out, rank, generator=gen), down=torch.randn(rank, inp, generator=gen), alpha=2.0)


def _weights(shapes: dict[str, tuple[int, ...]]) -> DictWeights:
    gen = torch.Generator().manual_seed(0)
    return DictWeights({k: torch.randn(*s, generator=gen) for k, s in shapes.items()})


def test_every_layer_is_planned_or_skipped_with_a_reason() -> None:
    lora = LoraFile(format="comfy", layers={"diffusion_model.blocks.0.attn.to_q": _factors(8, 8),
                                            "diffusion_model.nowhere": _factors(8, 8)},
                    unsupported={"diffusion_model.x.hada_w1_a": "LoHa adapter"})  # fmt: skip
    plan = plan_transfer(lora, _weights({KEY: (8, 8)}))
    assert list(plan.layers) == [KEY] and plan.names == {KEY: "diffusion_model.blocks.0.attn.to_q"}
    assert set(plan.skipped) == {"diffusion_model.nowhere", "diffusion_model.x.hada_w1_a"}


def test_host_rule_skips_with_its_own_reason() -> None:
    lora = LoraFile(format="comfy", layers={"diffusion_model.blocks.0.attn.to_q": _factors(8, 8)})
    with pytest.raises(NothingTransferableError, match=r"none of its 1 layers could be used with my model \(1× no"):
        plan_transfer(lora, _weights({KEY: (8, 8)}), source_name="my model", host_rule=lambda n, k: "no CLIP")


def test_all_shapes_wrong_is_a_shape_mismatch_naming_the_source() -> None:
    lora = LoraFile(format="comfy", layers={"diffusion_model.blocks.0.attn.to_q": _factors(16, 8)})
    with pytest.raises(ShapeMismatchError, match=r"no layer fits base\.safetensors \(1 shape mismatches, e\.g\. .*"
                       r"the LoRA layer is 16×8 but the source weight is 8×8\)\. .*as the source model\.$"):  # fmt: skip
        plan_transfer(lora, _weights({KEY: (8, 8)}), source_name="base.safetensors")
    assert shape_problem(_factors(8, 8), (8,)).startswith("the source weight is 1-D")


def test_a_misfitting_slice_says_where_the_key_map_cut_the_fused_weight(tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({QKV: torch.randn(24, 8)}, str(path))
    lora = LoraFile(format="peft", layers={"transformer.blocks.0.attn.to_q": _factors(12, 8),
                                           "transformer.blocks.0.attn.to_k": _factors(8, 8)})  # fmt: skip
    key_map = {"transformer.blocks.0.attn.to_q": (QKV, (0, 0, 8)), "transformer.blocks.0.attn.to_k": (QKV, (0, 8, 8))}
    plan = plan_transfer(lora, open_model(path), key_map)
    assert list(plan.layers) == [f"{QKV}[0:8:8]"]
    reason = plan.skipped["transformer.blocks.0.attn.to_q"].detail
    assert reason.startswith("shape mismatch: the LoRA layer is 12×8 but the source weight is 8×8 (rows 0–7 of")
    assert "a target model of another size of this family slices it elsewhere" in reason


def test_names_keep_the_loras_own_and_slices_keep_theirs_in_every_style(tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({QKV: torch.randn(24, 8), KEY: torch.randn(8, 8)}, str(path))
    lora = LoraFile(format="peft", layers={"transformer.blocks.0.attn.to_k": _factors(8, 8),
                                           "lora_unet_blocks_0_attn_to_q": _factors(8, 8)})  # fmt: skip
    key_map = {"transformer.blocks.0.attn.to_k": (QKV, (0, 8, 8))}
    model = open_model(path)
    plan = plan_transfer(lora, model, key_map)
    model.add_slices(plan.layers)
    result = transfer_adapter(plan.layers, model, model, TransferOptions(rank=4, method="copy"), names=plan.names)
    slice_key = f"{QKV}[0:8:8]"
    assert output_names(result, plan, "peft") == {slice_key: "transformer.blocks.0.attn.to_k",
                                                  KEY: "lora_unet_blocks_0_attn_to_q"}  # fmt: skip
    comfy = output_names(result, plan, "peft", "comfy")
    assert comfy == {slice_key: "transformer.blocks.0.attn.to_k", KEY: "diffusion_model.blocks.0.attn.to_q"}


def test_metadata_keeps_training_fields_and_drops_the_source_files_own() -> None:
    lora = LoraFile(format="kohya", layers={"lora_unet_blocks_0_attn_to_q": _factors(8, 8)},
                    metadata={"modelspec.trigger_phrase": "lrx", "ss_network_dim": "2", "sshs_model_hash": "ab",
                              "lorax.method": "old"})  # fmt: skip
    weights = _weights({KEY: (8, 8)})
    plan = plan_transfer(lora, weights)
    options = TransferOptions(rank=4)
    result = transfer_adapter(plan.layers, weights, weights, options, names=plan.names)
    meta = output_metadata(lora, options, lora_name="l.safetensors", source=ModelInfo("a", "f1", "SD15"),
                           target=ModelInfo("b", "f2"), report=result.report, host="a test")  # fmt: skip
    assert meta["modelspec.trigger_phrase"] == "lrx"
    assert "ss_network_dim" not in meta and "sshs_model_hash" not in meta
    assert meta["lorax.method"] == "auto" and meta["lorax.rank"] == "4" and meta["lorax.source_family"] == "SD15"
    assert json.loads(meta["lorax.report"])["totals"]["transferred"] == 1
    assert meta["lorax.host"].startswith("a test ") and all(isinstance(v, str) for v in meta.values())


def test_planning_codes_each_skip_by_its_cause_and_the_report_keeps_the_codes() -> None:
    from lorax_core.types import Skip, SkipReason

    lora = LoraFile(format="comfy", layers={"diffusion_model.blocks.0.attn.to_q": _factors(8, 8),
                                            "diffusion_model.blocks.1.attn.to_q": _factors(16, 8),
                                            "text_encoders.x.to_q": _factors(8, 8),
                                            "diffusion_model.nowhere": _factors(8, 8)},
                    unsupported={"diffusion_model.x.hada_w1_a": "LoHa adapter"})  # fmt: skip
    te_key = "text_encoders.x.to_q.weight"
    weights = _weights({KEY: (8, 8), "diffusion_model.blocks.1.attn.to_q.weight": (8, 8), te_key: (8, 8)})
    plan = plan_transfer(lora, weights, host_rule=lambda name, key: "needs CLIP" if key == te_key else "")
    assert plan.skipped == {
        "diffusion_model.x.hada_w1_a": Skip(SkipReason.UNSUPPORTED, "LoHa adapter"),
        "diffusion_model.nowhere": Skip(SkipReason.UNRESOLVED, plan.skipped["diffusion_model.nowhere"].detail),
        "diffusion_model.blocks.1.attn.to_q": Skip(
            SkipReason.SOURCE_SHAPE, "shape mismatch: the LoRA layer is 16×8 but the source weight is 8×8"
        ),
        "text_encoders.x.to_q": Skip(SkipReason.HOST_RULE, "needs CLIP"),
    }
    result = transfer_adapter(plan.layers, weights, weights, TransferOptions(rank=4), names=plan.names,
                              skipped=plan.skipped)  # fmt: skip
    report = {r.key: (r.code, r.reason) for r in result.report.layers}
    assert report["diffusion_model.x.hada_w1_a"] == (SkipReason.UNSUPPORTED, "LoHa adapter")
    assert report["text_encoders.x.to_q"] == (SkipReason.HOST_RULE, "needs CLIP")
    data = json.loads(result.report.to_json())
    assert {layer["key"]: layer["code"] for layer in data["layers"]}["diffusion_model.blocks.1.attn.to_q"] == (
        "source_shape"
    )
