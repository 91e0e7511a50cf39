"""Lazy model reading: key normalisation, fingerprints, lazy reads, refusal of pickles and corrupt files."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from lorax_core.errors import FormatError, UnsafeFileError
from lorax_core.modelio import file_fingerprint, model_key_map, open_model
from lorax_core.types import WeightSource


def test_full_sd15_checkpoint_keys():
    keys = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
        "first_stage_model.decoder.conv_out.weight",
    ]
    assert model_key_map(keys) == {
        "diffusion_model.input_blocks.0.0.weight": keys[0],
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight": keys[1],
        "first_stage_model.decoder.conv_out.weight": keys[2],
    }


def test_sdxl_and_sd2_text_encoders():
    keys = [
        "model.diffusion_model.out.2.weight",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        "conditioner.embedders.2.proj.weight",
        "cond_stage_model.model.ln_final.weight",
    ]
    assert sorted(model_key_map(keys)) == [
        "diffusion_model.out.2.weight",
        "text_encoders.clip_g.transformer.resblocks.0.attn.in_proj_weight",
        "text_encoders.clip_h.ln_final.weight",
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
        "text_encoders.embedder_2.proj.weight",
    ]


def test_diffusion_model_only_and_already_namespaced_files():
    assert model_key_map(["input_blocks.0.0.weight"]) == {
        "diffusion_model.input_blocks.0.0.weight": "input_blocks.0.0.weight"
    }
    assert model_key_map(["diffusion_model.x.weight"]) == {"diffusion_model.x.weight": "diffusion_model.x.weight"}


def test_lazy_weight_source(tmp_path):
    w = torch.randn(8, 4, dtype=torch.float16)
    path = tmp_path / "m.safetensors"
    save_file({"model.diffusion_model.a.weight": w, "model.diffusion_model.a.bias": torch.zeros(8)}, str(path))
    model = open_model(path)

    assert isinstance(model, WeightSource)
    assert model.is_checkpoint
    assert sorted(model.keys()) == ["diffusion_model.a.bias", "diffusion_model.a.weight"]
    assert model.shape("diffusion_model.a.weight") == (8, 4)
    got = model.get("diffusion_model.a.weight")
    assert got.dtype == torch.float16 and torch.equal(got, w)
    with pytest.raises(FormatError, match=re.escape(f"{path}: no weight 'diffusion_model.b.weight' in this model")):
        model.get("diffusion_model.b.weight")


def test_fingerprint_is_stable_and_sees_data_changes(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    w = torch.randn(64, 64)
    save_file({"x.weight": w}, str(a))
    save_file({"x.weight": w + 1}, str(b))
    assert file_fingerprint(a) == file_fingerprint(a) == open_model(a).fingerprint
    assert len(file_fingerprint(a)) == 16
    assert file_fingerprint(a) != file_fingerprint(b)


def test_pickle_model_refused(tmp_path):
    path = tmp_path / "sd15.ckpt"
    path.write_bytes(b"not even read")
    with pytest.raises(UnsafeFileError, match=re.escape(f"{path}: .ckpt files are Python pickles")):
        open_model(path)


def test_corrupt_model_names_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a.weight": torch.randn(16, 16)}, str(path))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(FormatError, match=re.escape(f"{path}: truncated or corrupt")):
        open_model(path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_get_reads_each_weight_dtype_exactly(tmp_path, dtype):
    # get() reads the tensor's bytes with a positional read (no memory map); the values and the
    # stored dtype must be exactly what safetensors wrote.
    w = torch.randn(6, 5).to(dtype)
    path = tmp_path / "m.safetensors"
    save_file({"model.diffusion_model.a.weight": w, "model.diffusion_model.b.weight": torch.zeros(0, 3)}, str(path))
    model = open_model(path)
    got = model.get("diffusion_model.a.weight")
    assert got.dtype == dtype
    assert torch.equal(got.view(torch.uint8), w.view(torch.uint8))
    assert model.get("diffusion_model.b.weight").shape == (0, 3)


def test_non_weight_dtype_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"model.diffusion_model.ids": torch.arange(4)}, str(path))
    with pytest.raises(FormatError, match=re.escape("has dtype 'I64', which is not a weight dtype")):
        open_model(path).get("diffusion_model.ids")


def test_file_shrunk_after_opening_is_reported(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"model.diffusion_model.a.weight": torch.randn(64, 64)}, str(path))
    model = open_model(path)
    with path.open("r+b") as fh:
        fh.truncate(path.stat().st_size - 100)
    with pytest.raises(FormatError, match=re.escape("truncated: tensor 'model.diffusion_model.a.weight' needs 16384 bytes")):
        model.get("diffusion_model.a.weight")
