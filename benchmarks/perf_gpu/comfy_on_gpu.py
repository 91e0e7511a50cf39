"""pytest plugin for the GPU machine: the node tier (tests/nodes) with ComfyUI on its GPU, not on the CPU.

    python -m pytest -p benchmarks.perf_gpu.comfy_on_gpu tests/nodes/…

``tests/nodes/comfy_harness.py`` sets ``comfy.cli_args.args.cpu = True`` before anything imports
``comfy.model_management``, so that a CUDA build of torch works on the GPU-less CI machine.
ComfyUI reads that flag once, when ``comfy.model_management`` is imported (v0.3.75 reads it
nowhere else). This plugin imports that module first, with the flag off, so ComfyUI has picked
``cuda:0`` before the harness runs; the harness's later assignment then changes nothing. It finds
ComfyUI as the harness does (``LORAX_COMFYUI``, default ``.comfyui``) and says which device won.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

log = logging.getLogger(__name__)
DEVICE = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """Import ``comfy.model_management`` with ``--cpu`` off, before tests/nodes/conftest.py runs."""
    root = Path(os.environ.get("LORAX_COMFYUI", Path(__file__).resolve().parents[2] / ".comfyui")).resolve()
    sys.path.insert(0, str(root))
    import comfy.cli_args  # noqa: TID251

    comfy.cli_args.args.cpu = False
    import comfy.model_management  # noqa: TID251

    device = comfy.model_management.get_torch_device()
    config.stash[DEVICE] = str(device)
    log.info("ComfyUI device for the node tier: %s", device)


def pytest_report_header(config: pytest.Config) -> str:
    return f"ComfyUI device (benchmarks.perf_gpu.comfy_on_gpu): {config.stash.get(DEVICE, '?')}"
