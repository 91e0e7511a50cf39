"""Class 5 in the node: the save node writes through the core's one atomic writer and never crashes.

A failing write (disk full) must leave nothing in ``models/loras``, neither the LoRA nor its
``.report.json``; an unusable save folder or an unusable ``LORA_MODEL`` is one message with the
node's name in front. Runs the real ComfyUI host like tests/nodes (never skipped).
"""

from __future__ import annotations

import errno
import math
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nodes"))
import comfy_harness  # noqa: F401  (puts ComfyUI first on sys.path and loads the pack)
import folder_paths  # noqa: TID251 -- the test drives the real host
from comfy_harness import pack_module

pytestmark = pytest.mark.comfy

SAVE = "Save Transferred LoRA"


@pytest.fixture
def loras(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """ComfyUI's first ``loras`` folder, in tmp_path."""
    folder = tmp_path / "loras"
    folder.mkdir()
    real = folder_paths.get_folder_paths
    monkeypatch.setattr(folder_paths, "get_folder_paths", lambda name: [str(folder)] if name == "loras" else real(name))
    return folder


def _transferred() -> object:
    """A TransferredLora as the transfer node returns it (one layer, with a report)."""
    host, types = pack_module("nodes._host"), pack_module("lorax_core.types")
    factors = types.LoraFactors(up=torch.ones(8, 2), down=torch.ones(2, 8))
    lora = host.TransferredLora({"diffusion_model.a.lora_up.weight": factors.up,
                                 "diffusion_model.a.lora_down.weight": factors.down})  # fmt: skip
    lora.factors = {"diffusion_model.a.weight": factors}
    lora.layer_names = {"diffusion_model.a.weight": "lora_unet_a"}
    lora.lora_file = None
    lora.metadata = {"lorax.method": "auto"}
    lora.report = types.TransferReport()
    return lora


def _save(lora: object, name: str = "moved") -> str:
    return pack_module("nodes.save").LoraXSaveTransferredLoRA.execute(lora=lora, file_name=name).result[0]


def test_disk_full_on_the_report_leaves_nothing_in_loras(loras: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io_module = pack_module("lorax_core.formats.io")
    real, calls = io_module._write_all, {"n": 0}

    def full_on_second(fd: int, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(io_module, "_write_all", full_on_second)
    report = loras / "lorax" / "moved.report.json"
    with pytest.raises(pack_module("lorax_core.errors").OutputError, match=re.escape(
        f"{SAVE}: {report}: could not write the file (No space left on device); free some space"
    )):  # fmt: skip
        _save(_transferred())
    assert list((loras / "lorax").iterdir()) == []


def test_save_writes_lora_and_report_together(loras: Path) -> None:
    assert _save(_transferred()) == "lorax/moved.safetensors"
    assert sorted(p.name for p in (loras / "lorax").iterdir()) == ["moved.report.json", "moved.safetensors"]
    # A leftover report of the same name moves both files to the next free counter.
    (loras / "lorax" / "again.report.json").write_text("{}")
    assert _save(_transferred(), "again") == "lorax/again_00001.safetensors"


def test_unusable_save_folder_is_one_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = tmp_path / "loras"
    blocked.write_text("a file where the loras folder should be")
    monkeypatch.setattr(folder_paths, "get_folder_paths", lambda name: [str(blocked)])
    with pytest.raises(pack_module("lorax_core.errors").OutputError, match=re.escape(
        f"{SAVE}: {blocked / 'lorax'}: cannot create the save folder ("
    )):  # fmt: skip
        _save(_transferred())


def test_lora_model_without_a_usable_layer_is_refused(loras: Path) -> None:
    nan = {"diffusion_model.a.lora_up.weight": torch.full((8, 2), math.nan),
           "diffusion_model.a.lora_down.weight": torch.ones(2, 8)}  # fmt: skip
    with pytest.raises(pack_module("lorax_core.errors").FormatError, match=re.escape(
        f"{SAVE}: the LORA_MODEL input has no layer this pack can save (1 of 1: NaN or Inf values in lora_up.weight"
    )):  # fmt: skip
        _save(nan)
    assert not (loras / "lorax").exists() or list((loras / "lorax").iterdir()) == []


def test_too_long_file_name_is_refused_before_the_run() -> None:
    save = pack_module("nodes.save").LoraXSaveTransferredLoRA
    assert save.validate_inputs("n" * 237) is True
    assert save.validate_inputs("n" * 300) == (
        f"{SAVE}: file_name is too long (300 bytes; at most 237 leave room for a counter and the suffix); shorten it."
    )
