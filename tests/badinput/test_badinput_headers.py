"""Class 1 of issue 11: malformed safetensors headers give one FormatError naming the file, in both readers.

Each case is a header defect found by attacking the readers (a dtype that is a list, JSON nested
100 000 deep, a 5 000-digit integer, overlapping / repeated / gapped byte ranges that the model
reader used to accept…). Every case is also refused by ``safetensors`` itself: the readers must
never be more permissive than the format.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _badinput_helpers import f32, raw_file
from safetensors import safe_open

from lorax_core.errors import FormatError
from lorax_core.formats import read_lora
from lorax_core.formats.io import read_header
from lorax_core.modelio import open_model

X = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
DEEP = 100_000

# (case id, header, data bytes, expected message start after "<path>: ")
CASES = [
    ("dtype-list", {"x": {**X, "dtype": ["F32"]}}, f32(1, 2),
     "corrupt safetensors header: tensor 'x' has dtype ['F32'], not a dtype name such as 'F16'."),
    ("dtype-object", {"x": {**X, "dtype": {"F32": 1}}}, f32(1, 2),
     "corrupt safetensors header: tensor 'x' has dtype an object with 1 keys, not a dtype name"),
    ("dtype-unknown", {"x": {**X, "dtype": "Q7"}}, f32(1, 2), "tensor 'x' has unsupported dtype 'Q7'."),
    ("deep-nesting", b'{"x": ' + b"[" * DEEP + b"]" * DEEP + b"}", b"",
     f"corrupt safetensors header: JSON nested {DEEP + 1} levels deep (a safetensors header has 3"),
    ("deep-unbalanced", b"[" * DEEP, b"", "corrupt safetensors header: JSON nested"),
    ("huge-int", b'{"x": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}', f32(1, 2),
     "corrupt safetensors header (not valid JSON: Exceeds the limit"),
    ("nan-token", b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": NaN}}', f32(1, 2),
     "corrupt safetensors header (not valid JSON: NaN is not a JSON value"),
    ("repeated-name", b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     b'"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', f32(1, 2),
     "corrupt safetensors header: the name 'x' appears twice."),
    ("negative-dim", {"x": {**X, "shape": [-2]}}, f32(1, 2),
     "corrupt safetensors header: tensor 'x' has shape [-2]; a shape is a list of non-negative integers."),
    ("float-dim", {"x": {**X, "shape": [2.0]}}, f32(1, 2), "corrupt safetensors header: tensor 'x' has shape [2.0];"),
    ("nested-shape", {"x": {**X, "shape": [[2]]}}, f32(1, 2),
     "corrupt safetensors header: tensor 'x' has shape a list of 1 items;"),
    ("dim-beyond-int64", {"x": {**X, "shape": [0, 2**64]}}, b"",
     "corrupt safetensors header: tensor 'x' has shape [0, 18446744073709551616] (more than 8 dimensions"),
    ("offsets-not-a-pair", {"x": {**X, "data_offsets": [0]}}, f32(1, 2),
     "corrupt safetensors header: tensor 'x' has data_offsets [0]; expected [start, end]."),
    ("offsets-beyond-file", {"x": {**X, "data_offsets": [8, 16]}}, f32(1, 2),
     "truncated or corrupt: tensor 'x' needs bytes 8..16 (8 for shape [2]) but the file holds 8 data bytes."),
    ("overlap", {"a": X, "b": X}, f32(1, 2),
     "corrupt safetensors header: tensor 'b' (bytes 0..8) overlaps tensor 'a' (which ends at byte 8)"),
    ("gap", {"x": {**X, "shape": [1], "data_offsets": [4, 8]}}, f32(1, 2),
     "corrupt safetensors header: data bytes 0..4 before the first tensor belong to no tensor"),
    ("gap-between", {"a": {**X, "shape": [1], "data_offsets": [0, 4]}, "b": {**X, "shape": [1], "data_offsets": [8, 12]}},
     f32(1, 2, 3), "corrupt safetensors header: data bytes 4..8 after tensor 'a' belong to no tensor"),
    ("trailing-bytes", {"x": X}, f32(1, 2, 3), "corrupt safetensors file: 4 bytes after the last tensor belong to no tensor"),
    ("metadata-not-string", {"__metadata__": {"steps": 10}, "x": X}, f32(1, 2),
     "corrupt safetensors metadata: the value of 'steps' is 10, not a string"),
    ("metadata-list", {"__metadata__": ["a"], "x": X}, f32(1, 2),
     "corrupt safetensors metadata: expected a map of strings, got ['a']."),
    ("entry-not-object", {"x": [1, 2]}, f32(1, 2), "corrupt safetensors header: entry 'x' is not an object."),
    ("header-not-object", [1, 2], b"", "corrupt safetensors header (a JSON list, not an object)."),
]  # fmt: skip


@pytest.mark.parametrize(("header", "data", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_header_is_one_format_error_in_every_reader(tmp_path: Path, header, data, message) -> None:
    path = raw_file(tmp_path / "bad.safetensors", header, data)
    expected = re.escape(f"{path}: {message}")
    for reader in (read_header, read_lora, open_model):
        with pytest.raises(FormatError, match=expected):
            reader(path)


@pytest.mark.parametrize(("header", "data"), [c[1:3] for c in CASES], ids=[c[0] for c in CASES])
def test_safetensors_itself_refuses_every_case(tmp_path: Path, header, data) -> None:
    """The readers are never more permissive than the format (``safe_open`` refuses these too)."""
    path = raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own error types vary by defect
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                handle.get_tensor(key)


def test_valid_hand_made_file_still_reads(tmp_path: Path) -> None:
    """The checks refuse the defects, not the format: tiled ranges, zero-size tensors and string metadata."""
    header = {
        "__metadata__": {"a": "b"},
        "empty": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
        "x": X,
        "y": {"dtype": "F16", "shape": [1, 1, 1, 1, 1, 1, 1, 2], "data_offsets": [8, 12]},
    }
    path = raw_file(tmp_path / "ok.safetensors", header, f32(1, 2) + b"\0" * 4)
    entries, metadata = read_header(path)
    assert sorted(entries) == ["empty", "x", "y"] and metadata == {"a": "b"}
    model = open_model(path)
    assert model.get("diffusion_model.x").tolist() == [1.0, 2.0]
    with safe_open(str(path), framework="pt") as handle:
        assert handle.get_tensor("y").shape == (1, 1, 1, 1, 1, 1, 1, 2)


def test_unreadable_file_is_a_format_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = raw_file(tmp_path / "ok.safetensors", {"x": X}, f32(1, 2))

    def refuse(*args: object, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(FormatError, match=re.escape(f"{path}: cannot read the file (Permission denied)")):
        read_header(path)
