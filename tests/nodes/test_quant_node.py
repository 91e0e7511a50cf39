"""fp8, scaled-fp8 and GGUF models in the nodes (issue 22), in a real in-process ComfyUI v0.3.75.

* a target loaded by the stock ``UNETLoader`` with ``weight_dtype`` ``fp8_e4m3fn``: the
  Transfer node reads what the ModelPatcher holds (fp8, upcast per layer);
* a scaled-fp8 file loaded by the stock loader: the weights the node reads through the patcher
  (ComfyUI's own dequantisation) equal the command line's file reader's, bit for bit;
* a ``.gguf`` source through Load Source Model.
"""

from __future__ import annotations

import folder_paths
import pytest
import torch
from comfy_harness import comfy_nodes, pack_module
from safetensors.torch import load_file, save_file

from scripts.quantize_model import quantize_file, scaled_fp8
from scripts.tiny_dit_families import TinyDit, make_family

pytestmark = pytest.mark.comfy

WAN_LAYERS = 20
KEY = "diffusion_model.blocks.0.self_attn.q.weight"


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> tuple[TinyDit, object]:
    tiny = make_family("wan")
    extra = tmp_path_factory.mktemp("quant_models")
    for folder, sub in (("diffusion_models", "diffusion_models"), ("loras", "loras")):
        folder_paths.add_model_folder_path(folder, str(tiny.root / sub))
    folder_paths.add_model_folder_path("diffusion_models", str(extra))
    return tiny, extra


def _transfer(source, target, lora_name: str):
    node = pack_module("nodes.transfer").LoraXTransferLoRA
    return node.execute(source=source, target=target, lora_name=lora_name, method="auto", rank=320, threshold=0.5,
                        target_clip=None).result  # fmt: skip


def _source(name: str):
    return pack_module("nodes.load").LoraXLoadSourceModel.execute(name).result[0]


@pytest.mark.parametrize(
    ("weight_dtype", "dtype"), [("fp8_e4m3fn", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)]
)
def test_unet_loader_fp8_target(wan, weight_dtype, dtype):
    tiny, _ = wan
    target = comfy_nodes.UNETLoader().load_unet(tiny.target.name, weight_dtype)[0]
    assert target.model.diffusion_model.blocks[0].self_attn.q.weight.dtype == dtype
    weights = pack_module("nodes._host").PatcherWeights(target)
    got = weights.get(KEY)
    assert got.dtype == torch.float32
    stored = load_file(str(tiny.target))[KEY.removeprefix("diffusion_model.")]
    assert torch.equal(got, stored.to(dtype).float())
    lora, text = _transfer(_source(tiny.source.name), target, tiny.loras["peft"].name)
    assert f"{WAN_LAYERS} of {WAN_LAYERS} layers transferred" in text, text
    assert {f.up.dtype for f in lora.factors.values()} == {torch.float16}  # the LoRA's dtype, not fp8


def test_scaled_fp8_patcher_and_file_reader_agree(wan):
    tiny, extra = wan
    path = extra / "wan_scaled_fp8.safetensors"
    save_file(scaled_fp8(load_file(str(tiny.target))), str(path))
    model = comfy_nodes.UNETLoader().load_unet(path.name, "default")[0]
    assert model.model.model_config.scaled_fp8 == torch.float8_e4m3fn  # ComfyUI took it as scaled fp8
    patcher = pack_module("nodes._host").PatcherWeights(model)
    reader = pack_module("lorax_core.modelio").SafetensorsWeights(path)
    for key in (KEY, "diffusion_model.blocks.1.ffn.2.weight"):
        assert torch.equal(patcher.get(key), reader.get(key)), key
    _, text = _transfer(_source(tiny.source.name), model, tiny.loras["peft"].name)
    assert f"{WAN_LAYERS} of {WAN_LAYERS} layers transferred" in text, text


def test_gguf_source_through_load_source_model(wan):
    pytest.importorskip("gguf")
    tiny, extra = wan
    quantize_file(tiny.source, extra / "wan_source_Q8_0.gguf", "Q8_0")
    assert "wan_source_Q8_0.gguf" in pack_module("nodes._host").source_model_names()
    source = _source("wan_source_Q8_0.gguf")
    assert source.family == "WAN21_T2V"
    target = comfy_nodes.UNETLoader().load_unet(tiny.target.name, "default")[0]
    _, text = _transfer(source, target, tiny.loras["peft"].name)
    assert f"{WAN_LAYERS} of {WAN_LAYERS} layers transferred" in text, text
