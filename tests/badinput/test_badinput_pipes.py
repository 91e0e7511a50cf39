"""Class 6 of issue 11: ``python -m lorax_core inspect X | head`` ends quietly, without a traceback."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from lorax_core.cli import EXIT_BROKEN_PIPE, main

ROOT = Path(__file__).resolve().parents[2]


def test_closed_pipe_in_a_real_process_prints_no_traceback(files) -> None:
    """The reader is gone before the first write: exit 141, nothing on stderr."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    read, write = os.pipe()
    os.close(read)  # like `| head` that has already exited
    try:
        done = subprocess.run(
            [sys.executable, "-m", "lorax_core", "inspect", str(files.lora)],
            stdout=write, stderr=subprocess.PIPE, env=env, cwd=files.dir, timeout=300, check=False,
        )  # fmt: skip
    finally:
        os.close(write)
    assert done.stderr.decode() == ""
    assert done.returncode == EXIT_BROKEN_PIPE


class _ClosedPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_broken_pipe_in_process_returns_141(files, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(["inspect", str(files.source)]) == EXIT_BROKEN_PIPE
    assert capsys.readouterr().err == ""
