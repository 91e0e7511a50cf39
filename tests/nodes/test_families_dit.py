"""DiT families (issue 13) in a real, in-process ComfyUI v0.3.75: Flux.1, SD3.5, Wan 2.1.

Models and LoRAs come from ``scripts/tiny_dit_families.py`` (built once, cached under
out/.cache). Per family: the Transfer node reports every layer, slices of fused weights are
transferred one by one under the LoRA's own layer names, and the saved file, applied by the
stock ``LoraLoader``, loads every key and patches the model exactly as the Apply node does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import folder_paths
import pytest
import torch
from comfy_harness import comfy_nodes, pack_module
from safetensors.torch import load_file

from scripts.tiny_dit_families import TinyDit, make_family

pytestmark = pytest.mark.comfy

# Layers of the tiny LoRAs (scripts/tiny_dit_families.py), and how many patch a slice of a fused weight.
FLUX_PEFT_LAYERS, FLUX_SLICES = 15, 10
FLUX_KOHYA_LAYERS = 6
WAN_LAYERS = 20


def _family(name: str) -> TinyDit:
    tiny = make_family(name)
    for folder, sub in (("diffusion_models", "diffusion_models"), ("loras", "loras")):
        folder_paths.add_model_folder_path(folder, str(tiny.root / sub))
    return tiny


def _load(path: Path, dtype: torch.dtype | None = None):
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(path), model_options={"dtype": dtype} if dtype else {})


def _source(path: Path):
    return pack_module("nodes.load").LoraXLoadSourceModel.execute(path.name).result[0]


def _transfer(source, target, lora_name: str, method: str = "auto", **kw):
    node = pack_module("nodes.transfer").LoraXTransferLoRA
    return node.execute(source=source, target=target, lora_name=lora_name, method=method, rank=kw.pop("rank", 320),
                        threshold=0.5, target_clip=None, **kw)  # fmt: skip


def _slice_names(lora) -> list[str]:
    slices = pack_module("lorax_core.slices")
    return [lora.layer_names[k] for k in lora.factors if slices.parse_slice_key(k) is not None]


def _weights(model) -> dict[str, torch.Tensor]:
    """Every patched weight of a MODEL as ComfyUI computes it (``calculate_weight`` on its patches)."""
    import comfy.lora

    state = model.model.state_dict()
    out = {}
    for key, patches in model.patches.items():
        out[key] = comfy.lora.calculate_weight(patches, state[key].float().clone(), key)
    return out


def _apply_save_and_stock_load(model, lora, folders: Path, file_name: str, caplog) -> tuple[dict, dict]:
    """Apply node and stock LoraLoader (on the saved file) on ``model``; their patched weights."""
    apply = pack_module("nodes.apply").LoraXApplyTransferredLoRA
    ours = apply.execute(model=model, lora=lora, strength_model=1.0, strength_clip=1.0).result[0]
    saved = pack_module("nodes.save").LoraXSaveTransferredLoRA.execute(lora=lora, file_name=file_name).result[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        stock = comfy_nodes.LoraLoader().load_lora(model, None, saved, 1.0, 0.0)[0]
    not_loaded = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert not_loaded == [], not_loaded
    return _weights(ours), _weights(stock)


@pytest.fixture(scope="module")
def sd35(folders) -> tuple[TinyDit, object, object]:
    tiny = _family("sd35")
    return tiny, _load(tiny.source), _load(tiny.target)


@pytest.fixture(scope="module")
def flux(folders) -> tuple[TinyDit, object, object]:
    tiny = _family("flux")
    return tiny, _load(tiny.source, torch.float16), _load(tiny.target, torch.float16)


def test_sd35_peft_lora_moves_every_slice_and_the_stock_loader_agrees(sd35, folders, caplog):
    tiny, _, target = sd35
    source = _source(tiny.source)
    assert source.family == "SD3"
    n_layers = len(pack_module("lorax_core.formats").read_lora(tiny.loras["peft"]).layers)
    lora, text = _transfer(source, target, tiny.loras["peft"].name).result
    assert f"{n_layers} of {n_layers} layers transferred" in text, text
    names = _slice_names(lora)
    assert names and all(n.startswith("transformer.transformer_blocks.") for n in names)
    assert {f"{n}.lora_up.weight" for n in names} <= set(lora)  # the LORA_MODEL keeps the LoRA's names
    ours, stock = _apply_save_and_stock_load(target, lora, folders, "sd35_moved", caplog)
    assert set(ours) == set(stock) and ours
    for key in ours:
        torch.testing.assert_close(stock[key], ours[key], rtol=1e-3, atol=1e-4)


def test_sd35_identity_round_trips_each_slice(sd35):
    tiny, source_model, _ = sd35
    lora_file = pack_module("lorax_core.formats").read_lora(tiny.loras["peft"])
    lora = _transfer(_source(tiny.source), source_model, tiny.loras["peft"].name, method="exact").result[0]
    by_name = {lora.layer_names[k]: f for k, f in lora.factors.items()}
    assert set(by_name) == set(lora_file.layers)
    for name, original in lora_file.layers.items():
        want = original.up2d().float() @ original.down2d().float() * original.scale
        got = by_name[name].up2d().float() @ by_name[name].down2d().float() * by_name[name].scale
        assert float((got - want).norm() / want.norm()) <= 1e-3, name


def test_wan_generic_key_map_transfers_and_applies(folders, caplog):
    tiny = _family("wan")
    source = _source(tiny.source)
    assert source.family == "WAN21_T2V"
    target = _load(tiny.target)
    lora, text = _transfer(source, target, tiny.loras["peft"].name).result
    assert f"{WAN_LAYERS} of {WAN_LAYERS} layers transferred" in text, text
    ours, stock = _apply_save_and_stock_load(target, lora, folders, "wan_moved", caplog)
    assert set(ours) == set(stock) and len(ours) == WAN_LAYERS
    for key in ours:
        torch.testing.assert_close(stock[key], ours[key], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_flux_peft_and_kohya_loras_on_fused_weights(flux, folders, caplog):
    tiny, _, target = flux
    source = _source(tiny.source)
    assert source.family == "FluxSchnell"
    # copy (asked by name) decomposes nothing: this checks the plumbing of 3072-wide slices cheaply.
    lora, text = _transfer(source, target, tiny.loras["peft"].name, method="copy").result
    assert f"{FLUX_PEFT_LAYERS} of {FLUX_PEFT_LAYERS} layers transferred" in text, text
    assert len(_slice_names(lora)) == FLUX_SLICES
    ours, stock = _apply_save_and_stock_load(target, lora, folders, "flux_peft_moved", caplog)
    assert set(ours) == set(stock)
    for key in ours:
        torch.testing.assert_close(stock[key], ours[key], rtol=1e-3, atol=1e-3)
    kohya, text = _transfer(source, target, tiny.loras["kohya"].name, method="copy").result
    assert f"{FLUX_KOHYA_LAYERS} of {FLUX_KOHYA_LAYERS} layers transferred" in text, text
    assert not _slice_names(kohya)  # kohya-Flux patches the fused weights whole


@pytest.mark.slow
def test_flux_fused_slices_round_trip_with_target_equal_source(flux):
    tiny, source_model, _ = flux
    full = load_file(str(tiny.loras["peft"]))
    # One slice, the MLP rows of linear1 (offset 3·3072 of 21504): two 3072-wide decompositions
    # (≈ 1 min on one core). SD3.5 covers every slice kind at full count above.
    names = ("transformer.single_transformer_blocks.0.proj_mlp",)
    part = {k: v for k, v in full.items() if k.rsplit(".", 2)[0] in names}
    lora = _transfer(_source(tiny.source), source_model, "", method="exact", lora=part).result[0]
    slices = pack_module("lorax_core.slices")
    assert len(lora.factors) == 1 and all(slices.parse_slice_key(k) is not None for k in lora.factors)
    for key, moved in lora.factors.items():
        name = lora.layer_names[key]
        up, down = full[f"{name}.lora_B.weight"].float(), full[f"{name}.lora_A.weight"].float()
        want = up @ down
        got = moved.up2d().float() @ moved.down2d().float() * moved.scale
        assert float((got - want).norm() / want.norm()) <= 1e-3, name


def test_sd35_large_to_medium_is_explained_as_a_width_mismatch(sd35):
    """Large → Medium (width 192 → 128, depth 3 → 2): nothing can move without data; both nodes say why."""
    tiny, _, _ = sd35
    medium = _load(_family("sd35_medium").target)
    source = _source(tiny.source)
    ui = pack_module("nodes._ui")
    errors = pack_module("lorax_core.errors")
    similarity = pack_module("nodes.similarity").LoraXSubspaceSimilarity
    with pytest.raises(
        errors.IncompatibleBaseError, match=r"^Compute Subspace Similarity: .*share no layer of the same shape"
    ):
        similarity.execute(source=source, target=medium, lora_name=ui.NO_LORA, rank=320, threshold=0.5)
    with pytest.raises(
        errors.NothingTransferableError, match=r"^Transfer LoRA: none of the \d+ layers was transferred"
    ):
        _transfer(source, medium, tiny.loras["peft"].name)


def test_a_slice_without_a_layer_name_of_its_own_is_refused():
    """A slice paired by similarity (a target with fewer blocks) has no LoRA name ComfyUI could load."""
    host = pack_module("nodes._host")
    key = "diffusion_model.joint_blocks.1.x_block.attn.qkv.weight[0:0:192]"
    assert host._native_name(key, "transformer.transformer_blocks.1.attn.to_q") == (
        "transformer.transformer_blocks.1.attn.to_q"
    )
    errors = pack_module("lorax_core.errors")
    with pytest.raises(errors.FormatError, match=r"^diffusion_model\..*\[0:0:192\] is a slice of a fused weight .* "
                       r"transfer onto a model with the source's blocks"):  # fmt: skip
        host._native_name(key, "lora_unet_joint_blocks_1_x_block_attn_qkv_weight[0:0:192]")
