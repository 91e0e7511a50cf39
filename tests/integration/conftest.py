"""A headless ComfyUI v0.3.75 server (LORAX_COMFYUI, default .comfyui) with the pack and the tiny models.

The server runs ``main.py --cpu`` in a subprocess on a free port for the whole session; every
file it writes goes to a temp folder. A missing host fails the run with a clear message —
these tests are never skipped (CI builds the host with scripts/setup.sh).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.make_tiny_models import TinyModels, make_tiny_models
from scripts.workflow_api import HeadlessComfy

REPO = Path(__file__).resolve().parents[2]
COMFY_ROOT = Path(os.environ.get("LORAX_COMFYUI", REPO / ".comfyui")).resolve()


def _check_host() -> None:
    if not (COMFY_ROOT / "main.py").is_file() or not (COMFY_ROOT / "custom_nodes" / "comfyui_lorax").exists():
        pytest.fail(
            f"ComfyUI host not found at {COMFY_ROOT} (or the pack is not linked into its custom_nodes); "
            "run `bash scripts/setup.sh` or set LORAX_COMFYUI. Integration tests are never skipped.",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    _check_host()
    return COMFY_ROOT


@pytest.fixture(scope="session")
def tiny_models() -> TinyModels:
    return make_tiny_models()


@pytest.fixture(scope="session")
def server(comfy_root: Path, tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeadlessComfy]:
    """The running server; its log is printed if a test using it fails."""
    comfy = HeadlessComfy(comfy_root, tmp_path_factory.mktemp("comfy"), tiny_models.root, python=sys.executable,
                         threads=1)
    comfy.start()
    try:
        yield comfy
    finally:
        comfy.stop()


@pytest.fixture(scope="session")
def object_info(server: HeadlessComfy) -> dict:
    return server.object_info()
