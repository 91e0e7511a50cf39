"""Migrate LoRA Folder in real ComfyUI (in-process): outputs, summary, agreement with Transfer LoRA,
Cancel between files (finished files stay, the unfinished one leaves nothing), resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from comfy_harness import pack_module
from safetensors import safe_open

pytestmark = pytest.mark.comfy

NODE = "nodes.migrate"


def _source(name: str):
    return pack_module("nodes.load").LoraXLoadSourceModel.execute(name).result[0]


def _library(folders: Path, tiny, name: str) -> Path:
    """A sub-folder of the first loras folder: the tiny LoRA twice (one deeper), a pickle and a damaged file."""
    root = folders / name
    (root / "deeper").mkdir(parents=True)
    shutil.copy(tiny.lora, root / "first.safetensors")
    shutil.copy(tiny.lora, root / "deeper" / "second.safetensors")
    (root / "old.pt").write_bytes(b"a pickle")
    (root / "broken.safetensors").write_bytes(b"\x00" * 40)
    return root


def _migrate(source, target, folder: str, target_name: str):
    node = pack_module(NODE).LoraXMigrateLoRAFolder
    return node.execute(source=source, target=target, folder=folder, target_name=target_name, method="auto",
                        rank=320, threshold=0.5, use_cache=True)  # fmt: skip


def test_schema_lists_subfolders_and_has_tooltips(node_classes, folders, tiny):
    _library(folders, tiny, "schema_lib")
    host = pack_module("nodes._host")
    import folder_paths

    folder_paths.filename_list_cache.clear()
    assert host.lora_subfolders()[0] == host.ALL_LORAS
    assert "schema_lib" in host.lora_subfolders() and "schema_lib/deeper" in host.lora_subfolders()
    schema = node_classes["LoraXMigrateLoRAFolder"].GET_SCHEMA()
    assert schema.display_name == "Migrate LoRA Folder" and schema.is_output_node
    assert all(item.tooltip for item in [*schema.inputs, *schema.outputs])
    docs = (Path(__file__).resolve().parents[2] / "docs" / "NODES.md").read_text()
    for item in [*schema.inputs, *schema.outputs]:
        assert item.tooltip in docs, f"docs/NODES.md lacks the tooltip of LoraXMigrateLoRAFolder.{item.id}"


def test_folder_is_migrated_with_a_summary_and_agrees_with_transfer_lora(folders, tiny, unet_models):
    _library(folders, tiny, "lib_a")
    _, target = unet_models
    source = _source(tiny.source_unet.name)
    out = _migrate(source, target, "lib_a", "tiny_target")
    summary_text, name = out.result
    assert name == "lorax/tiny_target"
    out_dir = folders / "lorax" / "tiny_target"
    summary = json.loads((out_dir / "summary.json").read_text())
    rows = {r["file"]: r for r in summary["rows"]}
    assert {f: (r["outcome"], r["reason"]) for f, r in rows.items()} == {
        "broken.safetensors": ("failed", "unreadable"),
        "old.pt": ("failed", "pickle"),
        # No target CLIP: the text-encoder layers are skipped with the pointer to target_clip.
        "first.safetensors": ("partial", "partial"),
        "deeper/second.safetensors": ("partial", "partial"),
    }
    assert summary_text.splitlines()[0].startswith("# LoRA folder migration")
    assert summary_text.index("broken.safetensors") < summary_text.index("first.safetensors")  # problems first
    for rel in ("first.safetensors", "deeper/second.safetensors"):
        assert (out_dir / rel).is_file() and (out_dir / rel).with_suffix(".report.json").is_file()
    # Same layers and decisions as Transfer LoRA on the same inputs.
    transfer = pack_module("nodes.transfer").LoraXTransferLoRA
    lora, _ = transfer.execute(source=source, target=target, lora_name=tiny.lora.name, method="auto", rank=320,
                               threshold=0.5).result  # fmt: skip
    totals = lora.report.totals()
    assert (rows["first.safetensors"]["layers"], rows["first.safetensors"]["transferred"]) == (
        totals["layers"], totals["transferred"]
    )  # fmt: skip
    with safe_open(str(out_dir / "first.safetensors"), "pt") as f:
        names = {k.split(".")[0] for k in f.keys()}
    assert names == {lora.layer_names[k] for k in lora.factors}  # the LoRA's own (kohya) key style


def test_cancel_between_files_keeps_finished_ones_and_leaves_nothing_half_written(
    folders, tiny, unet_models, monkeypatch
):
    import comfy.model_management as mm

    _library(folders, tiny, "lib_b")
    _, target = unet_models
    source = _source(tiny.source_unet.name)
    host = pack_module("nodes._host")
    real = host.progress_callback

    def cancel_in_the_last_file():
        bar = real()

        def progress(done: int, total: int) -> None:
            if done > 3 * total // 4:  # inside the fourth (last) file of the folder
                mm.interrupt_current_processing(True)
            bar(done, total)

        return progress

    monkeypatch.setattr(host, "progress_callback", cancel_in_the_last_file)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _migrate(source, target, "lib_b", "cancelled")
    finally:
        mm.interrupt_current_processing(False)
    out_dir = folders / "lorax" / "cancelled"
    # Sorted walk: broken, first, old.pt, then deeper/second (sub-folders after the files) is cancelled.
    assert sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()) == [
        "first.report.json", "first.safetensors", "summary.json", "summary.md"
    ]  # fmt: skip
    assert json.loads((out_dir / "summary.json").read_text())["interrupted"] is True
    stamp = (out_dir / "first.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(host, "progress_callback", real)
    _migrate(source, target, "lib_b", "cancelled")  # resume
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [r["file"] for r in summary["rows"] if r["resumed"]] == ["first.safetensors"]
    assert (out_dir / "first.safetensors").stat().st_mtime_ns == stamp
    assert (out_dir / "deeper" / "second.safetensors").is_file()


def test_a_missing_folder_is_one_clear_error(folders, tiny, unet_models):
    from comfy_harness import pack_module as pm

    errors = pm("lorax_core.errors")
    _, target = unet_models
    with pytest.raises(errors.OptionError, match="Migrate LoRA Folder: folder 'gone' is not in any loras folder"):
        _migrate(_source(tiny.source_unet.name), target, "gone", "")
