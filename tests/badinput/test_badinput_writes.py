"""Class 5 of issue 11: one atomic write path — LoRA and report both or neither, nothing left behind.

Faults are injected by patching the writer's two system-call points (``_create``, ``_write_all``
in ``lorax_core.formats.io``), which works as root too; a real read-only folder is also tried
where ``chmod`` binds (not as root, where it is skipped with the reason).
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from make_fixtures import one_error_line, transfer_argv

import lorax_core.formats.io as io_module
from lorax_core.cli import main
from lorax_core.errors import OutputError, OutputExistsError
from lorax_core.formats import read_lora, write_lora
from lorax_core.formats.io import check_output_path, write_text
from lorax_core.types import LoraFactors

ROOT = Path(__file__).resolve().parents[2]
LAYER = {"lora_unet_a": LoraFactors(up=torch.ones(8, 2), down=torch.ones(2, 8), alpha=1.0)}
INPUTS = ["lora.safetensors", "source.safetensors", "target.safetensors"]


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _fail_on_call(monkeypatch, name: str, call: int, error: OSError) -> None:
    """Make ``io_module.<name>`` raise ``error`` on its ``call``-th call (1-based)."""
    real = getattr(io_module, name)
    calls = {"n": 0}

    def patched(*args: object) -> object:
        calls["n"] += 1
        if calls["n"] == call:
            raise error
        return real(*args)

    monkeypatch.setattr(io_module, name, patched)


def test_disk_full_on_the_report_leaves_neither_file(files, capsys, monkeypatch) -> None:
    """The report used to be written after the LoRA: a failing report left the LoRA behind, exit ≠ 0."""
    _fail_on_call(monkeypatch, "_write_all", 2, OSError(errno.ENOSPC, "No space left on device"))
    report = files.dir / "out.report.json"
    assert main(transfer_argv(files, "out.safetensors", report=report)) == 2
    assert one_error_line(capsys) == (
        f"lorax_core transfer: error: {report}: could not write the file (No space left on device); "
        "free some space or choose another folder. Nothing was written."
    )
    assert _names(files.dir) == INPUTS


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
def test_a_failed_overwrite_gives_back_the_files_it_was_replacing(files, capsys, monkeypatch, links) -> None:
    """``--overwrite`` whose report fails to publish: the user's old LoRA and report come back."""
    out, report = files.dir / "out.safetensors", files.dir / "out.report.json"
    out.write_bytes(b"the user's old LoRA")
    report.write_text("the old report")
    if not links:  # a file system without hard links: the old files are renamed aside instead
        monkeypatch.setattr(io_module.os, "link", _no_links)
    _fail_on_call(monkeypatch, "_publish", 2, OSError(errno.EIO, "Input/output error"))
    assert main(transfer_argv(files, "out.safetensors", "--overwrite", report=report)) == 2
    assert one_error_line(capsys).startswith(f"lorax_core transfer: error: {report}: could not write the file")
    assert out.read_bytes() == b"the user's old LoRA" and report.read_text() == "the old report"
    assert _names(files.dir) == sorted([*INPUTS, out.name, report.name])  # no backup or temporary left


def _no_links(src: object, dst: object) -> None:
    raise OSError(errno.EPERM, "Operation not permitted")


def test_a_successful_overwrite_leaves_no_backup(files) -> None:
    out, report = files.dir / "out.safetensors", files.dir / "out.report.json"
    out.write_bytes(b"old")
    report.write_text("old")
    assert main(transfer_argv(files, "out.safetensors", "--overwrite", report=report)) == 0
    assert read_lora(out).layers and json.loads(report.read_text())["totals"]["transferred"] == 9
    assert _names(files.dir) == sorted([*INPUTS, out.name, report.name])


def test_disk_full_on_the_lora(tmp_path, monkeypatch) -> None:
    _fail_on_call(monkeypatch, "_write_all", 1, OSError(errno.ENOSPC, "No space left on device"))
    out = tmp_path / "o.safetensors"
    with pytest.raises(OutputError, match=re.escape(f"{out}: could not write the file (No space left on device)")):
        write_lora(out, LAYER, style="kohya", extra_files={tmp_path / "o.json": "{}"})
    assert _names(tmp_path) == []


def test_read_only_folder_patched(tmp_path, monkeypatch) -> None:
    _fail_on_call(monkeypatch, "_create", 1, OSError(errno.EROFS, "Read-only file system"))
    out = tmp_path / "o.safetensors"
    with pytest.raises(OutputError, match=re.escape(
        f"{out}: could not write the file (Read-only file system); choose a folder you can write to (not {tmp_path})."
    )):  # fmt: skip
        write_lora(out, LAYER, style="kohya")
    assert _names(tmp_path) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions (chmod)")
def test_read_only_folder_for_real(tmp_path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputError, match=re.escape(f"{folder / 'o.safetensors'}: could not write the file (")):
            write_lora(folder / "o.safetensors", LAYER, style="kohya")
        assert _names(folder) == []
    finally:
        folder.chmod(0o755)


def test_a_racing_writer_between_the_two_renames_leaves_neither_file(tmp_path, monkeypatch) -> None:
    """Both or neither also holds when the second final name appears at the last moment."""
    real = io_module._publish
    calls = {"n": 0}

    def racing(tmp: Path, final: Path, overwrite: bool) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            final.write_text("another process")
        real(tmp, final, overwrite)

    monkeypatch.setattr(io_module, "_publish", racing)
    out, report = tmp_path / "o.safetensors", tmp_path / "o.report.json"
    with pytest.raises(OutputExistsError, match=re.escape(f"{report}: the file already exists")):
        write_lora(out, LAYER, style="kohya", extra_files={report: "{}"})
    assert _names(tmp_path) == ["o.report.json"] and report.read_text() == "another process"


def test_output_path_that_is_a_folder(files, capsys) -> None:
    (files.dir / "out.safetensors").mkdir()
    assert main(transfer_argv(files, "out.safetensors", "--overwrite")) == 2
    assert one_error_line(capsys).startswith(
        f"lorax_core transfer: error: {files.dir / 'out.safetensors'}: is a folder; give a file name inside it"
    )


@pytest.mark.parametrize("overwrite", [False, True])
def test_out_equal_to_report_is_refused_before_any_work(files, capsys, overwrite) -> None:
    """It used to write the JSON into the .safetensors (with --overwrite) or write, then fail."""
    same = files.dir / "sub" / ".." / "out.safetensors"
    (files.dir / "sub").mkdir()
    extra = ["--overwrite"] if overwrite else []
    assert main(transfer_argv(files, "out.safetensors", *extra, report=same)) == 2
    assert one_error_line(capsys).startswith(
        f"lorax_core transfer: error: --report {same} is the same file as --out; give the JSON report its own name"
    )
    assert _names(files.dir) == sorted([*INPUTS, "sub"])


def test_dangling_symlink_is_not_replaced_without_overwrite(files, capsys) -> None:
    link, nowhere = files.dir / "out.safetensors", files.dir / "nowhere.safetensors"
    link.symlink_to(nowhere)
    assert main(transfer_argv(files)) == 2
    assert one_error_line(capsys).startswith(
        f"lorax_core transfer: error: {link}: a dangling symbolic link already exists; choose another name"
    )
    assert link.is_symlink() and not nowhere.exists()
    # With --overwrite the link itself is replaced by the file; its target is never created.
    assert main(transfer_argv(files, "out.safetensors", "--overwrite")) == 0
    assert not link.is_symlink() and link.is_file() and not nowhere.exists()


def test_name_too_long(files, capsys) -> None:
    name = "x" * 300 + ".safetensors"
    assert main(transfer_argv(files, name)) == 2
    assert one_error_line(capsys).startswith(
        f"lorax_core transfer: error: {files.dir / name}: the file name is too long (312 bytes; this folder allows 255); "
        "choose a shorter name."
    )
    report = files.dir / ("r" * 260 + ".json")
    with pytest.raises(OutputError, match=re.escape(f"{report}: the file name is too long (265 bytes")):
        write_text(report, "{}")


def test_a_long_but_valid_name_is_not_broken_by_its_temporary_file(tmp_path) -> None:
    name = "y" * (255 - len(".safetensors")) + ".safetensors"
    path = write_lora(tmp_path / name, LAYER, style="kohya")
    assert _names(tmp_path) == [name] and len(read_lora(path).layers) == 1


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_outputs_follow_the_umask(tmp_path, umask) -> None:
    old = os.umask(umask)
    try:
        path = write_lora(tmp_path / "o.safetensors", LAYER, style="kohya", extra_files={tmp_path / "o.json": "{}"})
    finally:
        os.umask(old)
    for p in (path, tmp_path / "o.json"):
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask


def test_non_regular_file_is_not_overwritten(tmp_path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match=re.escape(f"{fifo}: not a regular file (a device, pipe or socket)")):
        check_output_path(fifo, overwrite=True)


def test_stale_temporary_files_of_a_killed_writer_are_removed(tmp_path) -> None:
    stale, fresh = tmp_path / ".lorax-tmp-0123456789abcdef.tmp", tmp_path / ".lorax-tmp-fedcba9876543210.tmp"
    other = tmp_path / ".lorax-tmp-notes.txt"
    for p in (stale, fresh, other):
        p.write_bytes(b"partial")
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    os.utime(other, (hours_ago, hours_ago))
    write_lora(tmp_path / "o.safetensors", LAYER, style="kohya")
    assert _names(tmp_path) == [fresh.name, other.name, "o.safetensors"]


_KILLED_WRITER = """
import sys, time, torch
import lorax_core.formats.io as io_module
from lorax_core.formats import write_lora
from lorax_core.types import LoraFactors

def stall(fd, data):
    io_module.os.write(fd, data[: len(data) // 2])
    print("writing", flush=True)
    time.sleep(120)

io_module._write_all = stall
layer = LoraFactors(up=torch.ones(256, 64), down=torch.ones(64, 256))
write_lora(sys.argv[1], {"lora_unet_a": layer}, style="kohya")
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_sigkill_mid_write_leaves_only_our_temporary_which_the_next_write_removes(tmp_path) -> None:
    out = tmp_path / "killed.safetensors"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(out)], stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"writing"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        child.stdout.close()  # type: ignore[union-attr]
    (temp,) = tmp_path.iterdir()  # no final file, and no safetensors ".tmpXXXX" of its own
    assert temp.name.startswith(".lorax-tmp-") and temp.name.endswith(".tmp")
    hours_ago = time.time() - 2 * 3600
    os.utime(temp, (hours_ago, hours_ago))
    write_lora(tmp_path / "next.safetensors", LAYER, style="kohya")
    assert _names(tmp_path) == ["next.safetensors"]


def test_report_and_lora_are_both_written_and_valid(files) -> None:
    report = files.dir / "r.json"
    assert main(transfer_argv(files, "out.safetensors", report=report)) == 0
    assert json.loads(report.read_text())["totals"]["transferred"] > 0
    assert len(read_lora(files.dir / "out.safetensors").layers) > 0
    assert not [p for p in files.dir.iterdir() if p.name.startswith(".")]


def test_an_output_that_is_an_input_is_refused(files, capsys) -> None:
    assert main(transfer_argv(files, "lora.safetensors", "--overwrite")) == 2
    assert one_error_line(capsys).startswith(
        f"lorax_core transfer: error: --out {files.lora} is the --lora file; writing it would destroy an input."
    )
    before = files.source.read_bytes()
    assert main(transfer_argv(files, "out.safetensors", "--overwrite", report=files.source)) == 2
    assert one_error_line(capsys).startswith(f"lorax_core transfer: error: --report {files.source} is the --source file")
    assert files.source.read_bytes() == before
