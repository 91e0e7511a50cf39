"""Fuzzed readers: random, truncated and garbage files raise only the project's FormatError."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lorax_core.errors import FormatError
from lorax_core.formats import read_lora
from lorax_core.modelio import open_model

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _valid_bytes(tmp: Path) -> bytes:
    path = tmp / "seed.safetensors"
    save_file(
        {
            "lora_unet_a.lora_down.weight": torch.ones(2, 8),
            "lora_unet_a.lora_up.weight": torch.ones(8, 2),
            "lora_unet_a.alpha": torch.tensor(1.0),
        },
        str(path),
        metadata={"k": "v"},
    )
    return path.read_bytes()


def _read_all(path: Path) -> None:
    """Both readers must either succeed or raise FormatError (LoraxError), nothing else."""
    for reader in (read_lora, open_model):
        try:
            reader(path)
        except FormatError:
            pass


@FUZZ
@given(data=st.binary(max_size=256))
def test_random_bytes(tmp_path, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    _read_all(path)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=400))
def test_truncated_valid_file(tmp_path, cut):
    full = _valid_bytes(tmp_path)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(full[: min(cut, len(full) - 1)])
    with pytest.raises(FormatError):
        read_lora(path)


@FUZZ
@given(pos=st.integers(min_value=0, max_value=10_000), byte=st.integers(min_value=0, max_value=255))
def test_flipped_byte(tmp_path, pos, byte):
    data = bytearray(_valid_bytes(tmp_path))
    data[pos % len(data)] = byte
    path = tmp_path / "flip.safetensors"
    path.write_bytes(bytes(data))
    _read_all(path)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "Q7", 3]),
        "shape": st.lists(st.integers(-2, 6), max_size=3) | _json,
        "data_offsets": st.lists(st.integers(-4, 80), min_size=0, max_size=3) | _json,
    }
)


@FUZZ
@given(
    header=st.dictionaries(
        st.sampled_from(
            ["lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight", "lora_unet_a.alpha", "x", "__metadata__"]
        ),
        _entry | _json,
        max_size=4,
    ),
    payload=st.binary(max_size=64),
)
def test_garbage_headers(tmp_path, header, payload):
    raw = json.dumps(header).encode()
    path = tmp_path / "hdr.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    _read_all(path)
