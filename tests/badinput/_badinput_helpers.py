"""Helpers for the bad-input tests: hand-made safetensors files, the CLI in-process, one-line errors."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
sys.path.insert(0, str(FIXTURES))  # make_fixtures.py is a script, not a package

#: A module key of the tiny SD-like checkpoint (make_fixtures.sd_checkpoint) and its kohya name.
LINEAR = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
KOHYA = f"lora_unet_{LINEAR.replace('.', '_')}"
CHECKPOINT_KEY = f"model.diffusion_model.{LINEAR}.weight"




def raw_file(path: Path, header: object, data: bytes = b"") -> Path:
    """A file with an 8-byte length, ``header`` (JSON-encoded unless already bytes) and ``data``."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def f32(*values: float) -> bytes:
    return torch.tensor(values, dtype=torch.float32).numpy().tobytes()


