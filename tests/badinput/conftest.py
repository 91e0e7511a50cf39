"""Fixtures of the bad-input tests: a tiny source/target checkpoint pair and a kohya LoRA in tmp_path."""

from __future__ import annotations

from pathlib import Path

import _badinput_helpers  # noqa: F401  (puts tests/fixtures on sys.path; must precede make_fixtures)
import pytest
from make_fixtures import Files, kohya_lora, sd_checkpoint
from safetensors.torch import save_file


@pytest.fixture
def files(tmp_path: Path) -> Files:
    """A source checkpoint, a close fine-tune of it (the target) and a kohya LoRA for the source."""
    source = sd_checkpoint(0)
    save_file(source, str(tmp_path / "source.safetensors"))
    save_file(sd_checkpoint(7, related_to=source, noise=0.02), str(tmp_path / "target.safetensors"))
    save_file(kohya_lora(), str(tmp_path / "lora.safetensors"))
    return Files(
        tmp_path, tmp_path / "source.safetensors", tmp_path / "target.safetensors", tmp_path / "lora.safetensors"
    )
