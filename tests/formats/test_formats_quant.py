"""fp8, ComfyUI's scaled fp8 and GGUF base models (issue 22), made by the real tools on the tiny Wan 2.1.

Files: torch's fp8 casts, ComfyUI's scaled-fp8 layout and the ``gguf`` package's writer and
quantizers (``scripts/quantize_model.py``) applied to ``scripts/tiny_dit_families.py``'s Wan
model (fp16, 2 blocks, width 128). The transfer runs through the command line in-process.

Tolerances of the round trip (target = source, exact method; relative Frobenius error of each
layer's ΔW against the LoRA's): 1e-3 whatever the base's quantization (both sides hold the same
quantized weights, so the projection is the identity on the LoRA's subspace up to float32
rounding); outputs in an fp8 LoRA dtype re-round the factors: 0.07 for e4m3fn (3 mantissa bits,
relative rounding ≤ 2⁻⁴ per factor), 0.13 for e5m2 (2 bits, ≤ 2⁻³).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorax_core.cli import main
from lorax_core.gguf_model import GGUFWeights
from lorax_core.modelio import SafetensorsWeights, open_model
from scripts.quantize_model import GGUF_TYPES, quantize_file, scaled_fp8, write_gguf
from scripts.tiny_dit_families import TinyDit, make_family

gguf = pytest.importorskip("gguf")  # requirements-dev.txt pins it; the pack needs it only for .gguf models

pytestmark = pytest.mark.comfy  # make_family builds the model with ComfyUI's classes (once, cached)

KEY = "diffusion_model.blocks.0.self_attn.q.weight"
FP8 = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
LORA_DTYPE_TOLERANCE = {torch.float16: 1e-3, torch.float8_e4m3fn: 0.07, torch.float8_e5m2: 0.13}


@pytest.fixture(scope="module")
def wan() -> TinyDit:
    return make_family("wan")


@pytest.fixture
def no_fp8_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.isfinite`` as torch builds without fp8 kernels have it (``NotImplementedError`` on fp8)."""
    real = torch.isfinite

    def isfinite(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise NotImplementedError(f'"isfinite" not implemented for {tensor.dtype}')
        return real(tensor)

    monkeypatch.setattr(torch, "isfinite", isfinite)


def _transfer(tmp_path: Path, source: Path, target: Path, lora: Path, *extra: str) -> dict[str, torch.Tensor]:
    out = tmp_path / "out.safetensors"
    argv = ["transfer", "--quiet", "--no-cache", "--source", source, "--target", target, "--lora", lora, "--out", out]
    assert main([*map(str, argv), *extra]) == 0
    return load_file(str(out))


def _delta(lora: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return lora[f"{name}.lora_B.weight"].float() @ lora[f"{name}.lora_A.weight"].float()


def _lora_in(wan: TinyDit, tmp_path: Path, dtype: torch.dtype) -> Path:
    path = tmp_path / f"lora_{str(dtype).removeprefix('torch.')}.safetensors"
    save_file({k: v.to(dtype) for k, v in load_file(str(wan.loras["peft"])).items()}, str(path))
    return path


@pytest.mark.parametrize("kind", list(FP8))
@pytest.mark.parametrize("lora_dtype", [torch.float16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_base_models_transfer_and_outputs_keep_the_lora_dtype(wan, tmp_path, no_fp8_kernels, kind, lora_dtype):
    """fp8 source = target (a torch cast) with a float16 or fp8 LoRA, on a torch without fp8 kernels."""
    base = quantize_file(wan.source, tmp_path / f"{kind}.safetensors", kind)
    lora_path = _lora_in(wan, tmp_path, lora_dtype)
    out = _transfer(tmp_path, base, base, lora_path, "--method", "exact")
    lora = load_file(str(lora_path))
    names = {k.rsplit(".", 2)[0] for k in lora}
    assert {k.rsplit(".", 2)[0] for k in out} == names
    assert {v.dtype for k, v in out.items() if k.endswith(".weight")} == {lora_dtype}  # never upcast, never fp8 unasked
    for name in names:
        want = _delta(lora, name)
        assert float((_delta(out, name) - want).norm() / want.norm()) <= LORA_DTYPE_TOLERANCE[lora_dtype], name


def test_fp8_reader_keeps_storage_and_checks_per_layer(wan, tmp_path, no_fp8_kernels):
    base = quantize_file(wan.source, tmp_path / "e4m3.safetensors", "fp8_e4m3fn")
    weights = open_model(base)
    got = weights.get(KEY)
    assert got.dtype == torch.float8_e4m3fn  # upcast happens in each consumer, one layer at a time
    with safe_open(str(base), "pt") as fh:
        assert torch.equal(got.float(), fh.get_tensor(KEY.removeprefix("diffusion_model.")).float())


@pytest.mark.parametrize("kind", ["scaled_fp8", "Q8_0", "Q5_1", "Q4_0", "BF16"])
def test_quantized_round_trip_with_target_equal_source(wan, tmp_path, kind):
    suffix = ".safetensors" if kind == "scaled_fp8" else ".gguf"
    base = quantize_file(wan.source, tmp_path / f"{kind}{suffix}", kind)
    out = _transfer(tmp_path, base, base, wan.loras["peft"], "--method", "exact")
    lora = load_file(str(wan.loras["peft"]))
    for name in {k.rsplit(".", 2)[0] for k in lora}:
        want = _delta(lora, name)
        assert float((_delta(out, name) - want).norm() / want.norm()) <= 1e-3, name
        assert out[f"{name}.lora_B.weight"].dtype == torch.float16


def test_scaled_fp8_is_dequantised_as_comfyui_does(wan, tmp_path):
    """``weight.to(float32) * scale_weight.to(float32)`` (comfy/ops.py convert_weight), whole and per slice."""
    state = scaled_fp8(load_file(str(wan.source)))
    path = tmp_path / "scaled.safetensors"
    save_file(state, str(path))
    weights = SafetensorsWeights(path)
    assert weights.scaled_fp8
    file_key = KEY.removeprefix("diffusion_model.")
    want = state[file_key].to(torch.float32) * state[file_key.replace(".weight", ".scale_weight")].to(torch.float32)
    got = weights.get(KEY)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(weights.get(f"{KEY}[0:32:64]"), want[32:96])
    # Against the original fp16 weight: e4m3fn with a per-tensor scale keeps ~3 significant bits.
    original = load_file(str(wan.source))[file_key].float()
    assert float((got - original).norm() / original.norm()) < 0.05


def test_gguf_reader_uses_the_gguf_dequantisation_and_comfyui_gguf_names(wan, tmp_path):
    state = load_file(str(wan.source))
    path = write_gguf(state, tmp_path / "q4.gguf", "Q4_0")
    weights = GGUFWeights(path)
    assert weights.architecture == "wan" and "Q4_0" in weights.quant_types
    reader = gguf.GGUFReader(str(path))
    raw = next(t for t in reader.tensors if t.name == KEY.removeprefix("diffusion_model."))
    want = torch.from_numpy(np.array(gguf.quants.dequantize(raw.data, raw.tensor_type), dtype=np.float32))
    got = weights.get(KEY)
    assert got.dtype == torch.float32 and torch.equal(got, want.reshape(128, 128))
    assert set(weights.keys()) == {f"diffusion_model.{k}" for k in state}
    assert all(weights.shape(f"diffusion_model.{k}") == tuple(v.shape) for k, v in state.items())
    assert torch.equal(weights.get(f"{KEY}[0:64:32]"), got[64:96])  # rows sliced before dequantisation


def test_gguf_checkpoint_prefix_and_orig_shape_metadata(tmp_path):
    """As ComfyUI-GGUF: only ``model.diffusion_model.*`` tensors when present; shapes from ``comfy.gguf.orig_shape``."""
    writer = gguf.GGUFWriter(str(tmp_path / "ckpt.gguf"), "wan")
    conv = np.arange(2 * 3 * 1 * 2 * 2, dtype=np.float32)
    writer.add_tensor("model.diffusion_model.patch.weight", conv)  # stored flat, as converters do for 5-D
    writer.add_array("comfy.gguf.orig_shape.model.diffusion_model.patch.weight", [2, 3, 1, 2, 2])
    writer.add_tensor("model.diffusion_model.head.weight", np.ones((4, 32), dtype=np.float16))
    writer.add_tensor("first_stage_model.decoder.weight", np.ones((4, 4), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    weights = GGUFWeights(tmp_path / "ckpt.gguf")
    assert sorted(weights.keys()) == ["diffusion_model.head.weight", "diffusion_model.patch.weight"]
    assert weights.shape("diffusion_model.patch.weight") == (2, 3, 1, 2, 2)
    assert torch.equal(weights.get("diffusion_model.patch.weight").reshape(-1), torch.from_numpy(conv))


def test_every_measured_gguf_type_reads(wan, tmp_path):
    for kind in GGUF_TYPES:
        weights = GGUFWeights(quantize_file(wan.source, tmp_path / f"{kind}.gguf", kind))
        assert weights.get(KEY).shape == (128, 128), kind


def test_fp8_lycoris_factors_are_checked_on_a_float32_copy(no_fp8_kernels):
    """LyCORIS factors stored in fp8 parse (and a NaN among them is still a per-layer reason)."""
    from lorax_core.lycoris import build_lycoris
    from lorax_core.types import LoraFactors

    gen = torch.Generator().manual_seed(0)
    parts = {s: torch.randn(*shape, generator=gen).to(torch.float8_e5m2)
             for s, shape in ((".hada_w1_a", (12, 3)), (".hada_w1_b", (3, 10)), (".hada_w2_a", (12, 2)),
                              (".hada_w2_b", (2, 10)))}  # fmt: skip
    assert isinstance(build_lycoris("x", parts), LoraFactors)
    parts[".hada_w2_b"][0, 0] = float("nan")
    assert "NaN or Inf values in hada_w2_b" in str(build_lycoris("x", parts))
