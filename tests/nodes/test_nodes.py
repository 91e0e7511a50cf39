"""The five nodes' ``execute`` on tiny SD1.5 models inside a real, in-process ComfyUI v0.3.75."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from comfy_harness import pack_module
from safetensors import safe_open

pytestmark = pytest.mark.comfy

NODE_IDS = {
    "LoraXLoadSourceModel": "Load Source Model (LoRA-X)",
    "LoraXSubspaceSimilarity": "Compute Subspace Similarity",
    "LoraXTransferLoRA": "Transfer LoRA",
    "LoraXApplyTransferredLoRA": "Apply Transferred LoRA",
    "LoraXSaveTransferredLoRA": "Save Transferred LoRA",
}
UNET_LAYERS = 48  # attention/ff/proj layers of the tiny UNet the kohya LoRA patches
TE_LAYERS = 12  # text-encoder layers of the same LoRA


def _snapshot(model) -> tuple[dict, object, torch.Tensor]:
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    weight = model.model.state_dict()[key].detach().clone()
    return dict(model.patches), model.patches_uuid, weight


def _source(name: str):
    load = pack_module("nodes.load").LoraXLoadSourceModel
    return load.execute(name).result[0]


def _transfer(source, target, lora_name: str, clip=None, method: str = "auto", **kw):
    node = pack_module("nodes.transfer").LoraXTransferLoRA
    return node.execute(source=source, target=target, lora_name=lora_name, method=method, rank=320,
                        threshold=kw.pop("threshold", 0.5), target_clip=clip, **kw)


def test_pack_registers_five_nodes_with_tooltips(node_classes):
    for node_id, display in NODE_IDS.items():
        cls = node_classes[node_id]
        schema = cls.GET_SCHEMA()
        assert schema.display_name == display
        assert schema.category == "LoRA-X"
        missing = [i.id for i in schema.inputs if not i.tooltip]
        assert not missing, f"{node_id}: inputs without tooltip: {missing}"


def test_load_source_reads_header_only(tiny, folders):
    source = _source(tiny.source_checkpoint.name)
    assert source.family == "SD15"
    assert source.has_text_encoder
    unet_only = _source(tiny.source_unet.name)
    assert unet_only.family == "SD15" and not unet_only.has_text_encoder
    assert "diffusion_model.input_blocks.1.1.proj_in.weight" in set(unet_only.weights.keys())


def test_load_source_validation_refuses_pickles_and_unknown_files(folders):
    node = pack_module("nodes.load").LoraXLoadSourceModel
    assert "pickle" in node.validate_inputs("model.ckpt")
    message = node.validate_inputs("no_such_model.safetensors")
    assert message.startswith("Load Source Model (LoRA-X): ") and "refresh" in message


def test_transfer_without_clip_skips_text_encoder_and_leaves_model_untouched(tiny, unet_models):
    _, target = unet_models
    before = _snapshot(target)
    out = _transfer(_source(tiny.source_unet.name), target, tiny.lora.name)
    lora, report_text = out.result
    patches, uuid, weight = _snapshot(target)
    assert patches == before[0] and uuid == before[1] and torch.equal(weight, before[2])
    report = lora.report
    assert len(report.transferred) == UNET_LAYERS
    te_skips = [r for r in report.skipped if r.key.startswith("lora_te_")]
    assert len(te_skips) == TE_LAYERS
    assert all("connect the target model's CLIP" in r.reason for r in te_skips)
    assert f"{UNET_LAYERS} of {UNET_LAYERS + TE_LAYERS} layers transferred" in report_text
    assert out.ui["text"] == [report_text]  # the text the stock frontend shows, beside the report view
    assert all(k.startswith("diffusion_model.") for k in lora)
    assert len(lora) == 3 * UNET_LAYERS  # lora_down, lora_up, alpha per layer (ComfyUI-native)


def test_apply_patches_exactly_the_transferred_keys_and_matches_the_core(tiny, unet_models):
    _, target = unet_models
    lora = _transfer(_source(tiny.source_unet.name), target, tiny.lora.name).result[0]
    before = _snapshot(target)
    apply = pack_module("nodes.apply").LoraXApplyTransferredLoRA
    patched, clip = apply.execute(model=target, lora=lora, strength_model=0.75, strength_clip=1.0).result
    assert clip is None
    assert set(patched.patches) == set(lora.factors)  # add_patches accepted exactly the intended keys
    patches, uuid, weight = _snapshot(target)
    assert patches == before[0] and uuid == before[1] and torch.equal(weight, before[2])

    import comfy.lora

    state = target.model.state_dict()
    for key in list(lora.factors)[:6] + [k for k in lora.factors if "proj_in" in k][:1]:
        base = state[key].float()
        applied = comfy.lora.calculate_weight(patched.patches[key], base.clone(), key)
        f = lora.factors[key]
        delta = (f.up2d().float() @ f.down2d().float()).reshape(base.shape) * f.scale
        torch.testing.assert_close(applied - base, 0.75 * delta, rtol=1e-3, atol=1e-5)


def test_transfer_identity_method_exact_returns_the_lora(tiny, unet_models):
    source_model, _ = unet_models
    lora = _transfer(_source(tiny.source_unet.name), source_model, tiny.lora.name, method="exact").result[0]
    lora_file = pack_module("lorax_core.formats").read_lora(tiny.lora)
    key = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    original = lora_file.layers["lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k"]
    moved = lora.factors[key]
    want = original.up2d().float() @ original.down2d().float() * original.scale
    got = moved.up2d().float() @ moved.down2d().float() * moved.scale
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-4)


def test_transfer_with_clip_moves_text_encoder_layers(tiny, target_checkpoint):
    model, clip, _ = target_checkpoint
    lora = _transfer(_source(tiny.source_checkpoint.name), model, tiny.lora.name, clip=clip).result[0]
    assert len(lora.report.transferred) == UNET_LAYERS + TE_LAYERS
    te_keys = [k for k in lora.factors if k.startswith("text_encoders.clip_l.")]
    assert len(te_keys) == TE_LAYERS
    apply = pack_module("nodes.apply").LoraXApplyTransferredLoRA
    new_model, new_clip = apply.execute(model=model, clip=clip, lora=lora, strength_model=1.0, strength_clip=1.0).result
    assert {"text_encoders." + k for k in new_clip.patcher.patches} == set(te_keys)
    assert not clip.patcher.patches  # the input CLIP is untouched
    assert len(new_model.patches) == UNET_LAYERS


def test_transfer_of_foreign_lora_fails_with_node_name(tiny, unet_models):
    errors = pack_module("lorax_core.errors")
    _, target = unet_models
    # The same error as the command line's (one plan step in the core): no layer fits the source.
    with pytest.raises(errors.ShapeMismatchError, match=r"^Transfer LoRA: .*: no layer fits "
                       + tiny.source_unet.name.replace(".", r"\.") + r" \(4 shape mismatches"):
        _transfer(_source(tiny.source_unet.name), target, tiny.foreign_lora.name)


def test_transfer_reports_a_missing_lora_choice(tiny, unet_models):
    errors = pack_module("lorax_core.errors")
    _, target = unet_models
    with pytest.raises(errors.FormatError, match=r"^Transfer LoRA: no LoRA: pick a file in lora_name"):
        _transfer(_source(tiny.source_unet.name), target, "(none)")


def test_apply_foreign_lora_fails_with_node_name(tiny, unet_models):
    errors = pack_module("lorax_core.errors")
    _, target = unet_models
    foreign = pack_module("lorax_core.formats.io").load_tensors(tiny.foreign_lora)[0]
    apply = pack_module("nodes.apply").LoraXApplyTransferredLoRA
    with pytest.raises(errors.IncompatibleBaseError, match=r"^Apply Transferred LoRA: 4 of the LoRA's 4 layers do not fit this SD15 model \(e.g. "):
        apply.execute(model=target, lora=foreign, strength_model=1.0, strength_clip=1.0)


def test_similarity_node_chart_and_reuse(tiny, unet_models):
    source_model, target = unet_models
    node = pack_module("nodes.similarity").LoraXSubspaceSimilarity
    source = _source(tiny.source_unet.name)
    table, chart, summary = node.execute(source=source, target=target, lora_name=tiny.lora.name, rank=320,
                                         threshold=0.5).result
    assert len(table.entries) == UNET_LAYERS
    assert chart.ndim == 4 and chart.shape[0] == 1 and chart.shape[-1] == 3 and chart.dtype == torch.float32
    assert 0.0 <= float(chart.min()) and float(chart.max()) <= 1.0
    assert summary.startswith("subspace similarity:")
    same = node.execute(source=source, target=source_model, lora_name="(none)", rank=320, threshold=0.5).result[0]
    assert same.entries and all(e.passed and e.phi == pytest.approx(1.0, abs=1e-4) for e in same.entries)
    reused = _transfer(source, target, tiny.lora.name, similarity=table).result[0]
    by_key = {e.source_key: e for e in table.entries}
    for r in reused.report.transferred:
        assert r.phi_left == pytest.approx(by_key[r.source_key].phi_left)


def test_save_keeps_kohya_names_adds_counter_and_loads_with_stock_loader(tiny, unet_models, folders):
    _, target = unet_models
    lora = _transfer(_source(tiny.source_unet.name), target, tiny.lora.name).result[0]
    save = pack_module("nodes.save").LoraXSaveTransferredLoRA
    first = save.execute(lora=lora, file_name="moved").result[0]
    second = save.execute(lora=lora, file_name="moved").result[0]
    assert first == "lorax/moved.safetensors" and second == "lorax/moved_00001.safetensors"
    path = Path(folders) / first
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert all(k.startswith("lora_unet_") for k in keys)
    assert meta["lorax.method"] == "auto" and meta["lorax.source_model"] == tiny.source_unet.name
    assert json.loads(meta["lorax.report"])["totals"]["transferred"] == UNET_LAYERS
    assert (Path(folders) / "lorax" / "moved.report.json").is_file()

    import comfy.sd
    import comfy.utils

    loaded = comfy.sd.load_lora_for_models(target, None, comfy.utils.load_torch_file(str(path), safe_load=True), 1.0, 0)
    assert set(loaded[0].patches) == set(lora.factors)


def test_save_validation_rejects_paths(folders):
    save = pack_module("nodes.save").LoraXSaveTransferredLoRA
    assert save.validate_inputs("ok_name") is True
    assert save.validate_inputs("../escape").startswith("Save Transferred LoRA: file_name '../escape' must be a plain")
    assert "empty" in save.validate_inputs("  ")


def test_transfer_drives_a_progress_bar(tiny, unet_models):
    import comfy.utils

    _, target = unet_models
    seen: list[tuple[int, int]] = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        _transfer(_source(tiny.source_unet.name), target, tiny.lora.name)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    total = UNET_LAYERS + TE_LAYERS
    assert seen[-1] == (total, total) and len(seen) == total
    assert [v for v, _ in seen] == sorted(v for v, _ in seen)


def test_cancel_stops_a_transfer(tiny, unet_models):
    import comfy.model_management as mm

    _, target = unet_models
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _transfer(_source(tiny.source_unet.name), target, tiny.lora.name)
    finally:
        mm.interrupt_current_processing(False)


def test_docs_quote_every_tooltip(node_classes):
    docs = (Path(__file__).resolve().parents[2] / "docs" / "NODES.md").read_text()
    for node_id in NODE_IDS:
        schema = node_classes[node_id].GET_SCHEMA()
        for item in [*schema.inputs, *(schema.outputs or [])]:
            assert item.tooltip in docs, f"docs/NODES.md lacks the tooltip of {node_id}.{item.id}"


def test_transfer_accepts_a_lora_model_input(tiny, unet_models):
    _, target = unet_models
    source = _source(tiny.source_unet.name)
    first = _transfer(source, target, tiny.lora.name).result[0]
    again = _transfer(source, target, "(none)", lora=dict(first), method="copy").result[0]
    assert set(again.factors) == set(first.factors)
    key = next(iter(first.factors))
    torch.testing.assert_close(again.factors[key].up2d().float() @ again.factors[key].down2d().float(),
                               first.factors[key].up2d().float() @ first.factors[key].down2d().float())


def test_second_family_sdxl_derivative_transfers_and_applies(tiny, vega_models):
    _, target = vega_models
    source = _source(tiny.vega_source_unet.name)
    assert source.family == "Segmind_Vega"
    n_layers = len(pack_module("lorax_core.formats").read_lora(tiny.vega_lora).layers)
    lora, text = _transfer(source, target, tiny.vega_lora.name).result
    assert f"{n_layers} of {n_layers} layers transferred" in text
    assert "Segmind_Vega → Segmind_Vega" in text
    apply = pack_module("nodes.apply").LoraXApplyTransferredLoRA
    patched = apply.execute(model=target, lora=lora, strength_model=1.0, strength_clip=1.0).result[0]
    assert set(patched.patches) == set(lora.factors) and len(lora.factors) == n_layers


def test_sd15_lora_onto_sdxl_derivative_is_refused(tiny, vega_models):
    errors = pack_module("lorax_core.errors")
    _, target = vega_models
    with pytest.raises(errors.NothingTransferableError, match=r"^Transfer LoRA: none of the \d+ layers was transferred"):
        _transfer(_source(tiny.source_unet.name), target, tiny.lora.name)
