"""Write → read round trips for every format: same ΔW, same key names in source style."""

from __future__ import annotations

import pytest
import torch
from _formats_helpers import delta, make_layer
from safetensors import safe_open
from safetensors.torch import save_file

from lorax_core.formats import read_lora, write_lora
from lorax_core.types import LoraFactors, LoraXFactors

NAMES = {
    "kohya": "lora_unet_input_blocks_1_1_proj_in",
    "comfy": "diffusion_model.input_blocks.1.1.proj_in",
    "peft": "unet.down_blocks.0.attentions.0.proj_in",
}
SUFFIXES = {
    "kohya": (".lora_down.weight", ".lora_up.weight", ".alpha"),
    "comfy": (".lora_down.weight", ".lora_up.weight", ".alpha"),
    "peft": (".lora_A.weight", ".lora_B.weight"),
}


def file_keys(path) -> set[str]:
    with safe_open(str(path), framework="pt") as fh:
        return set(fh.keys())


@pytest.mark.parametrize("style", ["kohya", "comfy", "peft"])
@pytest.mark.parametrize("kind", ["linear", "conv1", "conv3"])
@pytest.mark.parametrize("alpha", [None, 1.5])
def test_write_read_keeps_delta_and_key_names(tmp_path, style, kind, alpha):
    layer = make_layer(kind, alpha)
    name = NAMES[style]
    path = write_lora(tmp_path / "out.safetensors", {name: layer}, style=style)

    back = read_lora(path)
    assert back.format == style
    assert list(back.layers) == [name]
    got = back.layers[name]
    assert isinstance(got, LoraFactors)
    assert got.up.shape == layer.up.shape and got.down.shape == layer.down.shape  # conv layout kept
    torch.testing.assert_close(delta(got), delta(layer), rtol=1e-5, atol=1e-5)
    assert file_keys(path) == {name + s for s in SUFFIXES[style]}
    if style != "peft":
        assert got.alpha == float(layer.rank)  # scale folded into up, alpha = rank


@pytest.mark.parametrize(
    ("keys", "down", "up"),
    [
        ("lora_unet_middle_block_1_proj_out", ".lora_down.weight", ".lora_up.weight"),
        ("base_model.model.blocks.0.attn.to_q", ".lora_A.default.weight", ".lora_B.default.weight"),
        ("unet.mid_block.attentions.0.proj_in", ".lora.down.weight", ".lora.up.weight"),
        ("transformer.blocks.0.ff", ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    ],
)
def test_rewrite_in_source_style_keeps_every_key(tmp_path, keys, down, up):
    layer = make_layer("linear", None, dtype=torch.float16)
    src = {keys + down: layer.down, keys + up: layer.up}
    save_file(src, str(tmp_path / "src.safetensors"))
    lora = read_lora(tmp_path / "src.safetensors")

    out = write_lora(tmp_path / "out.safetensors", lora.layers, style=lora)

    assert file_keys(out) == set(src)
    again = read_lora(out).layers[keys]
    assert again.up.dtype == torch.float16
    torch.testing.assert_close(delta(again), delta(layer))


def test_source_style_alpha_other_than_rank_is_folded(tmp_path):
    layer = make_layer("conv3", alpha=8.0, rank=4)
    name = NAMES["kohya"]
    src = tmp_path / "src.safetensors"
    save_file(
        {
            f"{name}.lora_down.weight": layer.down,
            f"{name}.lora_up.weight": layer.up,
            f"{name}.alpha": torch.tensor(8.0),
        },
        str(src),
    )
    lora = read_lora(src)
    assert lora.layers[name].alpha == 8.0  # kept exactly as read

    back = read_lora(write_lora(tmp_path / "out.safetensors", lora.layers, style=lora)).layers[name]

    assert back.alpha == 4.0
    torch.testing.assert_close(delta(back), delta(layer))


def test_comfy_style_on_request_from_a_kohya_source(tmp_path, golden):
    lora = read_lora(golden / "kohya_sd15.safetensors")
    renamed = {"diffusion_model." + n.removeprefix("lora_unet_"): f for n, f in lora.layers.items()}

    back = read_lora(write_lora(tmp_path / "out.safetensors", renamed, style="comfy"))

    assert back.format == "comfy"
    for name, layer in renamed.items():
        torch.testing.assert_close(delta(back.layers[name]), delta(layer))


@pytest.mark.parametrize("core", [torch.randn(6), torch.randn(6, 6)], ids=["diagonal", "full"])
@pytest.mark.parametrize("shape", [(32, 24), (32, 8, 3, 3)], ids=["linear", "conv3"])
def test_lorax_round_trip(tmp_path, core, shape):
    name = "diffusion_model.input_blocks.1.1.proj_in"
    layer = LoraXFactors(core=core.to(torch.bfloat16), shape=shape)

    path = write_lora(tmp_path / "x.safetensors", {name: layer}, metadata={"note": "hi"})
    back = read_lora(path)

    assert back.format == "lorax"
    got = back.layers[name]
    assert isinstance(got, LoraXFactors)
    assert got.shape == shape
    assert got.core.dtype == torch.bfloat16
    assert torch.equal(got.core, layer.core)
    assert back.metadata["lorax.format"] == "lorax-core"
    assert back.metadata["note"] == "hi"
    assert back.metadata["lorax.tool_version"]


def test_metadata_round_trip_and_unknown_style(tmp_path):
    from lorax_core.errors import FormatError

    layer = make_layer("linear", None)
    path = write_lora(
        tmp_path / "m.safetensors",
        {NAMES["kohya"]: layer},
        style="kohya",
        metadata={"lorax.method": "prolora", "lorax.rank": "320"},
    )
    meta = read_lora(path).metadata
    assert meta["lorax.method"] == "prolora" and meta["lorax.rank"] == "320"
    with pytest.raises(FormatError, match=r"unknown output style 'a1111'; use one of kohya, comfy, peft"):
        write_lora(tmp_path / "n.safetensors", {NAMES["kohya"]: layer}, style="a1111")
