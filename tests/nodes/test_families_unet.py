"""SDXL (te1 + te2), SD2.x and an SSD-1B-like renumbered target in a real, in-process ComfyUI v0.3.75.

Models from ``scripts/tiny_unet_families.py`` (generated once, cached under out/.cache). For each
family: ComfyUI detects it; the Transfer node reports every layer; the saved file loads with the
stock ``LoraLoader`` with no key left unloaded and the same patches as our Apply node; the
similarity node's pre-check explains a cross-family or cross-size pair before any maths.
"""

from __future__ import annotations

import logging
import re

import folder_paths
import pytest
import torch
from comfy_harness import comfy_nodes, pack_module

from scripts.tiny_unet_families import SSD_KEEP, TE_LAYERS, UnetFamilies, make_unet_families

pytestmark = pytest.mark.comfy

TE_PARTS = 6  # q, k, v, out_proj, fc1, fc2 per text-encoder block


@pytest.fixture(scope="session")
def fam(folders) -> UnetFamilies:
    models = make_unet_families()
    for folder in ("checkpoints", "diffusion_models", "loras"):
        # Appended, not default: the save node keeps writing into the test's own loras folder.
        folder_paths.add_model_folder_path(folder, str(models.root / folder))
    return models


def _checkpoint(path):
    import comfy.sd

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=True)
    return model, clip


@pytest.fixture(scope="session")
def sdxl(fam):
    return _checkpoint(fam.sdxl_target)


@pytest.fixture(scope="session")
def sd2(fam):
    return _checkpoint(fam.sd2_target)


@pytest.fixture(scope="session")
def ssd(fam):
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(fam.ssd_target))


def _source(name: str):
    return pack_module("nodes.load").LoraXLoadSourceModel.execute(name).result[0]


def _transfer(source, target, lora_name: str, clip=None):
    node = pack_module("nodes.transfer").LoraXTransferLoRA
    return node.execute(source=source, target=target, lora_name=lora_name, method="auto", rank=320, threshold=0.5,
                        target_clip=clip)  # fmt: skip


def _n_layers(path) -> int:
    return len(pack_module("lorax_core.formats").read_lora(path).layers)


def _stock_load_equals_apply(lora, model, clip, file_name: str, caplog) -> None:
    """Save, load with the stock LoraLoader (no key left unloaded), and compare with the Apply node's patches."""
    import comfy.lora

    saved = pack_module("nodes.save").LoraXSaveTransferredLoRA.execute(lora=lora, file_name=file_name).result[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        stock_model, stock_clip = comfy_nodes.LoraLoader().load_lora(model, clip, saved, 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text
    apply = pack_module("nodes.apply").LoraXApplyTransferredLoRA
    ours_model, ours_clip = apply.execute(model=model, clip=clip, lora=lora, strength_model=1.0,
                                          strength_clip=1.0).result  # fmt: skip
    pairs = [(stock_model, ours_model, model.model_state_dict())]
    if clip is not None:
        pairs.append((stock_clip.patcher, ours_clip.patcher, clip.patcher.model_state_dict()))
    n = 0
    for stock, ours, state in pairs:
        assert set(stock.patches) == set(ours.patches) and stock.patches
        for key in stock.patches:
            base = state[key].float()
            want = comfy.lora.calculate_weight(ours.patches[key], base.clone(), key)
            got = comfy.lora.calculate_weight(stock.patches[key], base.clone(), key)
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
            n += 1
    assert n == len(lora.factors)


def test_text_encoders_read_from_file_equal_what_comfyui_loads(fam, sdxl, sd2):
    """The fused OpenCLIP in_proj, sliced by lorax_core.modelio, equals ComfyUI's own conversion."""
    open_model = pack_module("lorax_core.modelio").open_model
    for path, (_, clip), encoders in (
        (fam.sdxl_target, sdxl, ("clip_l", "clip_g")),
        (fam.sd2_target, sd2, ("clip_h",)),
    ):
        weights = open_model(path)
        state = clip.patcher.model_state_dict()
        compared = 0
        for key, value in state.items():
            if any(
                key.startswith(f"{e}.transformer.text_model.encoder.layers.{i}.") for e in encoders for i in TE_LAYERS
            ):
                assert torch.equal(weights.get("text_encoders." + key).to(value.dtype), value), key
                compared += 1
        assert compared == 16 * len(encoders) * len(TE_LAYERS)  # 8 weights + 8 biases per block


@pytest.mark.parametrize(
    ("family", "encoders"), [("SDXL", {"clip_l": "lora_te1_", "clip_g": "lora_te2_"}), ("SD20", {"clip_h": "lora_te_"})]
)
def test_checkpoint_family_transfers_every_layer_and_loads_in_stock_comfyui(fam, sdxl, sd2, family, encoders, caplog):
    source_file, lora_file, (model, clip) = (
        (fam.sdxl_source, fam.sdxl_lora, sdxl) if family == "SDXL" else (fam.sd2_source, fam.sd2_lora, sd2)
    )
    source = _source(source_file.name)
    assert source.family == family and pack_module("nodes._host").model_family(model) == family
    n = _n_layers(lora_file)
    lora, text = _transfer(source, model, lora_file.name, clip=clip).result
    assert f"{n} of {n} layers transferred" in text, text
    assert not lora.report.skipped
    for encoder, prefix in encoders.items():
        keys = [k for k in lora.factors if k.startswith(f"text_encoders.{encoder}.")]
        assert len(keys) == TE_PARTS * len(TE_LAYERS), encoder
        assert sum(1 for r in lora.report.transferred if r.key.startswith(prefix)) == len(keys)
    _stock_load_equals_apply(lora, model, clip, f"{family.lower()}_moved", caplog)


def test_ssd1b_like_target_pairs_each_renumbered_block_with_its_true_partner(fam, ssd, caplog):
    matching = pack_module("lorax_core.matching")
    source = _source(fam.sdxl_source.name)
    assert pack_module("nodes._host").model_family(ssd) == "SSD1B"
    n = _n_layers(fam.sdxl_deep_lora)
    lora, text = _transfer(source, ssd, fam.sdxl_deep_lora.name).result
    report = lora.report
    assert len(report.layers) == n == 10 * 10  # ten blocks of input_blocks.7.1, ten layers each
    block = re.compile(r"input_blocks\.7\.1\.transformer_blocks\.(\d+)\.")
    for r in report.transferred:
        i, j = int(block.search(r.source_key)[1]), int(block.search(r.target_key)[1])
        assert i in SSD_KEEP and j == SSD_KEEP.index(i), (r.source_key, r.target_key)
    assert len(report.transferred) == 10 * len(SSD_KEEP)
    assert {r.reason for r in report.skipped} == {matching.DEPTH_TAKEN}
    assert f"{10 * len(SSD_KEEP)} of {n} layers transferred" in text
    _stock_load_equals_apply(lora, ssd, None, "ssd_moved", caplog)


def test_sd15_lora_onto_sd2_is_a_width_mismatch_on_cross_attention(tiny, fam, sd2):
    model, _ = sd2
    host, transfer = pack_module("nodes._host"), pack_module("lorax_core.transfer")
    source = _source(tiny.source_unet.name)
    plan = host.plan_transfer(host.load_lora_file(tiny.lora.name, None), source, model, None)
    options = pack_module("lorax_core.types").TransferOptions(force=True, device="cpu")
    result = transfer.transfer_adapter(plan.layers, source.weights, host.PatcherWeights(model), options,
                                       names=plan.names)  # fmt: skip
    widths = [r for r in result.report.skipped if r.reason == pack_module("lorax_core.types").SkipReason.WIDTH.text]
    assert widths and all(re.search(r"attn2_to_[kv]$", r.key) for r in widths)
    assert {r.target_shape for r in widths} == {(320, 1024)} and {r.source_shape for r in widths} == {(320, 768)}
    assert len(result.report.transferred) + len(widths) == len(plan.layers)  # forced: only widths are skipped
    errors = pack_module("lorax_core.errors")
    with pytest.raises(errors.NothingTransferableError, match=r"^Transfer LoRA: none of the \d+ layers"):
        _transfer(source, model, tiny.lora.name)  # unrelated families: every same-width layer scores at chance


def test_similarity_precheck_explains_family_width_and_depth(tiny, fam, sd2, ssd):
    node = pack_module("nodes.similarity").LoraXSubspaceSimilarity
    model, _ = sd2
    summary = node.execute(source=_source(tiny.source_unet.name), target=model, lora_name=tiny.lora.name, rank=320,
                           threshold=0.5).result[2]  # fmt: skip
    assert "pre-check: the source is SD15 and the target is SD20: different model families" in summary
    assert re.search(r"pre-check: 8 of 48 layers differ in width and are not compared \(e\.g\. \S+attn2\.to_[kv]\.weight: "
                     r"source 320×768, target 320×1024\)", summary)  # fmt: skip
    deep = node.execute(source=_source(fam.sdxl_source.name), target=ssd, lora_name=fam.sdxl_deep_lora.name,
                        rank=320, threshold=0.5).result[2]  # fmt: skip
    assert re.search(r"pre-check: 2 blocks have another depth \(e\.g\. diffusion_model\.input_blocks\.[78]\.1\."
                     r"transformer_blocks: 10 in the source, 4 in the target\)", deep)  # fmt: skip
    assert "the source is" not in deep  # ComfyUI's SSD1B config derives from SDXL's: one family


def test_similarity_precheck_refuses_a_pair_with_nothing_in_common(fam, unet_models):
    errors = pack_module("lorax_core.errors")
    node = pack_module("nodes.similarity").LoraXSubspaceSimilarity
    _, sd15 = unet_models
    with pytest.raises(errors.IncompatibleBaseError, match=(
        r"^Compute Subspace Similarity: source lorax_tiny_sdxl_source\.safetensors \(SDXL\) and target \(SD15\) share "
        r"no layer of the same shape among the 100 asked about \(e\.g\. \S+ is not in the target\); nothing can be "
        r"compared\. Pick a target of the source's family")):  # fmt: skip
        node.execute(source=_source(fam.sdxl_source.name), target=sd15, lora_name=fam.sdxl_deep_lora.name, rank=320,
                     threshold=0.5)  # fmt: skip
