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


from make_fixtures import Files  # noqa: E402  (after the sys.path line above)


def raw_file(path: Path, header: object, data: bytes = b"") -> Path:
    """A file with an 8-byte length, ``header`` (JSON-encoded unless already bytes) and ``data``."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def f32(*values: float) -> bytes:
    return torch.tensor(values, dtype=torch.float32).numpy().tobytes()


def transfer_argv(files: Files, out: str | Path = "out.safetensors", *extra: str, **over: object) -> list[str]:
    """``transfer`` arguments for the tiny files (rank 16, no cache, no progress bar)."""
    args: dict[str, object] = {"--source": files.source, "--target": files.target, "--lora": files.lora,
                               "--out": files.dir / out, "--rank": 16}  # fmt: skip
    args.update({k if k.startswith("--") else f"--{k.replace('_', '-')}": v for k, v in over.items()})
    flat = ["transfer", "--quiet", "--no-cache", *extra]
    for k, v in args.items():
        flat += [k, str(v)]
    return flat


def one_error_line(capsys) -> str:
    """The single stderr line of a failed command (asserts it is exactly one line)."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()
