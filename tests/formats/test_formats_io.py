"""Safe reading and atomic writing: pickles refused, corrupt files named, no overwrite, no escapes."""

from __future__ import annotations

import json
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch
from _formats_helpers import make_layer
from safetensors.torch import save_file

from lorax_core.errors import FormatError, OutputError, OutputExistsError, UnsafeFileError
from lorax_core.formats import read_lora, write_lora
from lorax_core.formats.io import check_output_path, load_tensors, read_header, save_tensors

LAYER = {"lora_unet_a": make_layer("linear", 2.0)}


class _Boom:
    """Unpickling this object would create a marker file: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".pkl"])
def test_pickle_files_are_refused_and_never_unpickled(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps(_Boom(marker)))

    with pytest.raises(UnsafeFileError, match=re.escape(f"{path}: {suffix} files are Python pickles")) as info:
        read_lora(path)
    assert "convert" in str(info.value).lower() and ".safetensors" in str(info.value)
    assert not marker.exists()


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FormatError, match=re.escape(f"{tmp_path / 'nope.safetensors'}: no such file; check the path.")):
        read_header(tmp_path / "nope.safetensors")
    with pytest.raises(FormatError, match=re.escape(f"{tmp_path}: not a file; pass a .safetensors file.")):
        read_header(tmp_path)


def _valid_file(tmp_path: Path) -> Path:
    path = tmp_path / "ok.safetensors"
    save_file(
        {"lora_unet_a.lora_down.weight": torch.ones(2, 8), "lora_unet_a.lora_up.weight": torch.ones(8, 2)}, str(path)
    )
    return path


def test_truncated_file_names_the_file(tmp_path):
    path = _valid_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(FormatError, match=re.escape(f"{path}: truncated or corrupt: tensor")):
        read_lora(path)


def test_tiny_and_non_json_files(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(FormatError, match=re.escape(f"{short}: not a safetensors file (only 3 bytes")):
        read_lora(short)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{x")
    with pytest.raises(FormatError, match=re.escape(f"{garbage}: corrupt safetensors header (not valid JSON")):
        read_lora(garbage)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(FormatError, match=re.escape(f"{huge}: not a safetensors file, or truncated")):
        read_lora(huge)


def test_header_with_bad_dtype_or_offsets(tmp_path):
    def write(header: dict, data: bytes = b"\0" * 8) -> Path:
        raw = json.dumps(header).encode()
        path = tmp_path / "bad.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        return path

    path = write({"x": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}})
    with pytest.raises(FormatError, match=re.escape(f"{path}: tensor 'x' has unsupported dtype 'Q7'.")):
        read_header(path)
    path = write({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}})
    with pytest.raises(FormatError, match=re.escape("tensor 'x' needs bytes 0..8 (16 for shape [4])")):
        read_header(path)
    path = write({"__metadata__": {"a": "b"}, "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    assert read_header(path) == ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, {"a": "b"})


def test_load_tensors_keeps_dtype(tmp_path):
    path = tmp_path / "h.safetensors"
    save_file({"a": torch.ones(2, dtype=torch.bfloat16)}, str(path), metadata={"k": "v"})
    tensors, meta = load_tensors(path)
    assert tensors["a"].dtype == torch.bfloat16 and meta == {"k": "v"}


def test_no_overwrite_unless_asked(tmp_path):
    path = write_lora(tmp_path / "o.safetensors", LAYER, style="kohya")
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match=re.escape(f"{path}: the file already exists")):
        write_lora(path, {"lora_unet_b": make_layer("linear", None, seed=3)}, style="kohya")
    assert path.read_bytes() == before

    write_lora(path, {"lora_unet_b": make_layer("linear", None, seed=3)}, style="kohya", overwrite=True)
    assert list(read_lora(path).layers) == ["lora_unet_b"]


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    write_lora(tmp_path / "o.safetensors", LAYER, style="kohya")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors"]


def test_failed_write_leaves_no_output_and_no_temporary(tmp_path, monkeypatch):
    import errno

    import lorax_core.formats.io as io_module

    def broken(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    # The writer serialises in memory and writes the bytes itself (no safetensors temp file).
    monkeypatch.setattr(io_module, "_write_all", broken)
    out = tmp_path / "o.safetensors"
    with pytest.raises(OutputError, match=re.escape(f"{out}: could not write the file (No space left on device)")):
        save_tensors(out, {"a": torch.ones(2)})
    assert list(tmp_path.iterdir()) == []


def test_output_name_escaping_its_folder_is_refused(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    with pytest.raises(FormatError, match=re.escape("../evil.safetensors: the output name escapes its folder")):
        check_output_path("../evil.safetensors", folder=folder)
    with pytest.raises(FormatError, match=re.escape("/etc/x.safetensors: the output name escapes its folder")):
        check_output_path("/etc/x.safetensors", folder=folder)
    (folder / "sub").mkdir()
    assert check_output_path("sub/ok.safetensors", folder=folder) == (folder / "sub" / "ok.safetensors").resolve()


def test_bad_output_names(tmp_path):
    with pytest.raises(FormatError, match=re.escape("out.ckpt: output files are written as .safetensors")):
        check_output_path(tmp_path / "out.ckpt")
    missing = tmp_path / "no" / "o.safetensors"
    with pytest.raises(FormatError, match=re.escape(f"{missing}: the folder {missing.parent} does not exist")):
        check_output_path(missing)


def test_metadata_must_be_strings(tmp_path):
    with pytest.raises(FormatError, match=re.escape("safetensors metadata must be strings; keys ['rank'] are not.")):
        save_tensors(tmp_path / "o.safetensors", {"a": torch.ones(2)}, {"rank": 4})  # type: ignore[dict-item]
