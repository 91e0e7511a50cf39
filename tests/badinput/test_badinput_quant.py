"""Broken quantized base models (issue 22): each is one clear message naming the file, the tensor and the fix.

Truncated GGUF, a GGUF tensor of a quantization type the gguf package does not know, a file
that is not GGUF, and ComfyUI scaled-fp8 files whose scale is missing, of the wrong shape or NaN.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from make_fixtures import Files, one_error_line, transfer_argv
from safetensors.torch import load_file, save_file

from lorax_core.cli import main
from lorax_core.errors import FormatError, NonFiniteError
from lorax_core.library import EXIT_PARTIAL
from lorax_core.modelio import open_model

gguf = pytest.importorskip("gguf")

LAYER = "blocks.0.q"


def _gguf(path: Path) -> Path:
    writer = gguf.GGUFWriter(str(path), "wan")
    q8 = gguf.GGMLQuantizationType.Q8_0
    writer.add_tensor(f"{LAYER}.weight", gguf.quants.quantize(np.ones((8, 64), dtype=np.float32), q8), raw_dtype=q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_truncated_gguf(tmp_path: Path) -> None:
    data = _gguf(tmp_path / "full.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-100])
    with pytest.raises(FormatError, match=r"cut\.gguf: truncated or corrupt GGUF file .* re-download or re-convert"):
        open_model(cut)


def test_unknown_quant_type(tmp_path: Path) -> None:
    data = bytearray(_gguf(tmp_path / "full.gguf").read_bytes())
    # Tensor info: name, n_dims (u32), dims (u64 each), type (u32), offset (u64).
    at = data.find(f"{LAYER}.weight".encode()) + len(f"{LAYER}.weight")
    n_dims = int.from_bytes(data[at : at + 4], "little")
    at += 4 + 8 * n_dims
    data[at : at + 4] = (250).to_bytes(4, "little")
    bad = tmp_path / "unknown.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"unknown\.gguf: a tensor uses a quantization type the installed gguf .*250"):
        open_model(bad)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"\x00" * 64)
    with pytest.raises(FormatError, match=r"fake\.gguf: not a GGUF file \(it does not start with 'GGUF'\)"):
        open_model(fake)


def _scaled(files: Files, tmp_path: Path, scale: torch.Tensor | None) -> tuple[Path, str]:
    """The fixture's source as scaled fp8, with ``scale`` (or none) as the first weight's ``scale_weight``."""
    state = load_file(str(files.source))
    key = next(k for k, v in state.items() if k.startswith("model.diffusion_model.") and v.ndim == 2)
    state[key] = state[key].to(torch.float8_e4m3fn)
    if scale is not None:
        state[key[: -len("weight")] + "scale_weight"] = scale
    state["model.diffusion_model.scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "scaled.safetensors"
    save_file(state, str(path))
    return path, key.removeprefix("model.")


@pytest.mark.parametrize(
    ("scale", "error", "message"),
    [
        (None, FormatError, r"is fp8 without its scale '.*scale_weight'; the layer cannot be dequantised"),
        (torch.ones(3), FormatError, r"scale tensor '.*scale_weight' has shape \(3,\) .* one float32 number per layer"),
        (torch.tensor(float("nan")), NonFiniteError, r"scale tensor '.*scale_weight' is nan \(NaN or Inf\)"),
    ],
    ids=["missing", "wrong-shape", "nan"],
)
def test_broken_scaled_fp8_scales(files: Files, tmp_path: Path, capsys, scale, error, message) -> None:
    path, key = _scaled(files, tmp_path, scale)
    with pytest.raises(error, match=message):
        open_model(path).get(key)
    # Through the command line: one line on stderr, or (NaN: the layer's weights are damaged, as
    # for any non-finite base weight) that layer skipped with its reason in the report, and the
    # partial transfer's own exit status.
    code = main(transfer_argv(files, source=path, target=path, report=tmp_path / "r.json"))
    if error is FormatError:
        assert code != 0 and "scaled.safetensors" in one_error_line(capsys)
    else:
        layers = json.loads((tmp_path / "r.json").read_text())["layers"]
        skipped = [layer for layer in layers if layer["status"] != "transferred"]
        assert code == EXIT_PARTIAL and len(skipped) == 1 and "NaN" in skipped[0]["reason"], skipped
