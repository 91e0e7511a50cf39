"""Class 4 of issue 11: a device the machine cannot use is one OptionError (exit 2), before any work."""

from __future__ import annotations

import re

import pytest
import torch
from make_fixtures import one_error_line, transfer_argv

from lorax_core.cli import main
from lorax_core.errors import OptionError
from lorax_core.types import TransferOptions, check_device


@pytest.mark.parametrize("command", ["transfer", "similarity"])
def test_bogus_device_is_one_line_exit_2(files, capsys, command) -> None:
    argv = transfer_argv(files) if command == "transfer" else [
        "similarity", "--quiet", "--no-cache", "--source", str(files.source), "--target", str(files.target)]  # fmt: skip
    assert main([*argv, "--device", "bogus"]) == 2
    assert one_error_line(capsys).startswith(
        f"lorax_core {command}: error: --device 'bogus' is not a device name; use cpu, cuda, cuda:1 or mps."
    )
    assert not (files.dir / "out.safetensors").exists()


def test_cuda_without_cuda_is_one_line_exit_2(files, capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*transfer_argv(files), "--device", "cuda"]) == 2
    assert one_error_line(capsys).startswith(
        f"lorax_core transfer: error: --device 'cuda': this machine's PyTorch ({torch.__version__}) cannot use a "
        "cuda device; use cpu, or install a PyTorch build with cuda support."
    )


def test_cuda_index_beyond_the_devices(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(OptionError, match=re.escape("device 'cuda:3': there are only 1 cuda device(s), numbered from 0")):
        check_device("cuda:3")
    assert check_device("cuda:0") == "cuda:0"


def test_transfer_options_check_the_device() -> None:
    with pytest.raises(OptionError, match=re.escape("device 'gpu0' is not a device name")):
        TransferOptions(device="gpu0")
    assert TransferOptions(device="cpu").device == "cpu"
