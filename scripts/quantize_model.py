"""Quantized copies of a diffusion-model ``.safetensors`` file, made with the real tools.

* ``fp8_e4m3fn`` / ``fp8_e5m2``: torch's cast of every 2-D weight (what ComfyUI's
  ``weight_dtype`` fp8 option and most shared fp8 checkpoints hold);
* ``scaled_fp8``: ComfyUI's scaled-fp8 layout (``comfy/ops.py`` ``scaled_fp8_ops``, v0.3.75):
  every 2-D weight ``W`` stored as ``(W / s).to(float8_e4m3fn)`` with a float32 scalar
  ``<module>.scale_weight = s = max|W| / 448`` (448: e4m3fn's largest value), and the marker
  tensor ``scaled_fp8`` (an empty e4m3fn tensor, as ComfyUI's own ``state_dict_for_saving``
  writes it);
* GGUF ``Q8_0``, ``Q5_1``, ``Q5_0``, ``Q4_1``, ``Q4_0``, ``BF16``, ``F16``: the ``gguf``
  package's writer and quantizers on every 2-D weight whose row length fits the type's block
  (others stay F16/F32, as llama.cpp-based converters keep small tensors). The Python package
  has no K-quant quantizers (``Q6_K``/``Q5_K``/``Q4_K`` raise ``NotImplementedError``), so those
  types are read but not made here.

Usage::

    python scripts/quantize_model.py MODEL.safetensors OUT TYPE   # TYPE: fp8_e4m3fn, scaled_fp8, Q8_0...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8 = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
GGUF_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "BF16", "F16")
KINDS = (*FP8, "scaled_fp8", *GGUF_TYPES)


def fp8_cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every 2-D weight cast to ``dtype`` (round to nearest); other tensors kept."""
    return {k: v.to(dtype) if v.ndim == 2 and k.endswith(".weight") else v for k, v in state.items()}


def scaled_fp8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled-fp8 layout of ``state`` (module docstring)."""
    out: dict[str, torch.Tensor] = {}
    e4m3_max = torch.finfo(torch.float8_e4m3fn).max
    for key, value in state.items():
        if value.ndim == 2 and key.endswith(".weight"):
            w = value.float()
            scale = (w.abs().max() / e4m3_max).clamp_min(torch.finfo(torch.float32).tiny)
            out[key] = (w / scale).to(torch.float8_e4m3fn)
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[key] = value
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def write_gguf(state: dict[str, torch.Tensor], path: Path, qtype: str, arch: str = "wan") -> Path:
    """``state`` as a GGUF file of type ``qtype`` (module docstring), with the gguf package's writer."""
    import gguf
    from gguf import quants

    kind = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[kind][0]
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in state.items():
        array = value.float().numpy()
        if value.ndim == 2 and key.endswith(".weight") and array.shape[1] % block == 0:
            writer.add_tensor(key, quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(key, value.to(torch.float16 if value.is_floating_point() else value.dtype).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantize_file(model: Path, out: Path, kind: str, arch: str = "wan") -> Path:
    """Write ``model`` quantized as ``kind`` (one of :data:`KINDS`) to ``out``."""
    state = load_file(str(model))
    if kind in FP8:
        save_file(fp8_cast(state, FP8[kind]), str(out))
    elif kind == "scaled_fp8":
        save_file(scaled_fp8(state), str(out))
    elif kind in GGUF_TYPES:
        write_gguf(state, out, kind, arch)
    else:
        raise SystemExit(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--arch", default="wan", help="GGUF general.architecture (default wan)")
    args = parser.parse_args(argv)
    print(quantize_file(args.model, args.out, args.kind, args.arch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
