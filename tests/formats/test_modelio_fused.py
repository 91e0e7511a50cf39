"""OpenCLIP text encoders (SD2.x clip_h, SDXL clip_g) read under ComfyUI's HF names, fused q/k/v as row slices.

The end-to-end check against ComfyUI's own conversion (the loaded CLIP's weights) is in
tests/nodes/test_families_unet.py; here the layout on small synthetic files.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from lorax_core.errors import FormatError, NonFiniteError
from lorax_core.modelio import open_model

W = 8  # the encoder width; in_proj is (3W, W)
HF = "text_model.encoder.layers.{}.{}"


def _openclip(prefix: str, gen: torch.Generator, layers: int = 2) -> dict[str, torch.Tensor]:
    sd = {
        f"{prefix}positional_embedding": torch.randn(5, W, generator=gen),
        f"{prefix}token_embedding.weight": torch.randn(11, W, generator=gen),
        f"{prefix}ln_final.weight": torch.ones(W),
        f"{prefix}ln_final.bias": torch.zeros(W),
        f"{prefix}text_projection": torch.randn(W, 6, generator=gen),
    }
    for i in range(layers):
        block = f"{prefix}transformer.resblocks.{i}."
        sd |= {
            block + "attn.in_proj_weight": torch.randn(3 * W, W, generator=gen),
            block + "attn.in_proj_bias": torch.randn(3 * W, generator=gen),
            block + "attn.out_proj.weight": torch.randn(W, W, generator=gen),
            block + "mlp.c_fc.weight": torch.randn(4 * W, W, generator=gen),
            block + "mlp.c_proj.weight": torch.randn(W, 4 * W, generator=gen),
            block + "ln_1.weight": torch.ones(W),
            block + "ln_2.bias": torch.zeros(W),
        }
    return sd


@pytest.fixture
def sdxl(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sd = {"model.diffusion_model.out.2.weight": torch.randn(4, 4, 3, 3, generator=gen)}
    sd["conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"] = torch.randn(
        4, 4, generator=gen
    )
    sd |= _openclip("conditioner.embedders.1.model.", gen)
    sd = {k: v.to(torch.float16) for k, v in sd.items()}
    path = tmp_path / "sdxl.safetensors"
    save_file(sd, str(path))
    return path, sd


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fused_qkv_read_as_row_slices(tmp_path, dtype):
    gen = torch.Generator().manual_seed(1)
    sd = {k: v.to(dtype) for k, v in _openclip("cond_stage_model.model.", gen).items()}
    sd["model.diffusion_model.x.weight"] = torch.zeros(2, 2, dtype=dtype)
    path = tmp_path / "sd2.safetensors"
    save_file(sd, str(path))
    model = open_model(path)
    for i in range(2):
        fused_w = sd[f"cond_stage_model.model.transformer.resblocks.{i}.attn.in_proj_weight"]
        fused_b = sd[f"cond_stage_model.model.transformer.resblocks.{i}.attn.in_proj_bias"]
        for j, part in enumerate(("q_proj", "k_proj", "v_proj")):
            key = f"text_encoders.clip_h.transformer.{HF.format(i, 'self_attn.' + part)}"
            assert model.shape(key + ".weight") == (W, W)
            got = model.get(key + ".weight")
            assert got.dtype == dtype and torch.equal(got, fused_w[j * W : (j + 1) * W])
            assert torch.equal(model.get(key + ".bias"), fused_b[j * W : (j + 1) * W])
            assert model.file_key(key + ".weight").endswith(f"resblocks.{i}.attn.in_proj_weight")


def test_openclip_names_become_comfyui_hf_names(sdxl):
    path, sd = sdxl
    model = open_model(path)
    keys = set(model.keys())
    g = "text_encoders.clip_g.transformer."
    expected_g = {
        g + "text_model.embeddings.position_embedding.weight",
        g + "text_model.embeddings.token_embedding.weight",
        g + "text_model.final_layer_norm.weight",
        g + "text_model.final_layer_norm.bias",
        "text_encoders.clip_g.text_projection",  # kept: ComfyUI stores it transposed, no LoRA patches it
    }
    for i in range(2):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            expected_g |= {g + HF.format(i, part) + ".weight", g + HF.format(i, part) + ".bias"}
        for part in (
            "self_attn.out_proj.weight",
            "mlp.fc1.weight",
            "mlp.fc2.weight",
            "layer_norm1.weight",
            "layer_norm2.bias",
        ):
            expected_g.add(g + HF.format(i, part))
    assert {k for k in keys if k.startswith("text_encoders.clip_g.")} == expected_g
    assert "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "diffusion_model.out.2.weight" in keys and model.is_checkpoint
    assert not any("resblocks" in k or "in_proj" in k for k in keys)  # no fused name left to patch by mistake
    assert torch.equal(
        model.get(g + HF.format(1, "mlp.fc1.weight")),
        sd["conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_fc.weight"],
    )
    assert model.shape(g + HF.format(0, "mlp.fc2.weight")) == (W, 4 * W)


def test_fused_name_is_not_a_model_key(sdxl):
    path, _ = sdxl
    model = open_model(path)
    fused = "text_encoders.clip_g.transformer.resblocks.0.attn.in_proj_weight"
    with pytest.raises(FormatError, match=re.escape(f"{path}: no weight {fused!r} in this model")):
        model.get(fused)


def test_nan_is_reported_only_in_the_slice_that_holds_it(tmp_path):
    gen = torch.Generator().manual_seed(2)
    sd = _openclip("conditioner.embedders.1.model.", gen, layers=1)
    sd["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"][W + 3, 2] = float("nan")  # k rows
    sd["model.diffusion_model.x.weight"] = torch.zeros(2, 2)
    path = tmp_path / "nan.safetensors"
    save_file(sd, str(path))
    model = open_model(path)
    base = "text_encoders.clip_g.transformer." + HF.format(0, "self_attn.{}.weight")
    assert torch.isfinite(model.get(base.format("q_proj"))).all()
    assert torch.isfinite(model.get(base.format("v_proj"))).all()
    with pytest.raises(NonFiniteError, match=r"in_proj_weight' holds 1 NaN or Inf values of 64"):
        model.get(base.format("k_proj"))
