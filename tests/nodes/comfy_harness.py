"""In-process ComfyUI harness (imported first by conftest.py): the real host (LORAX_COMFYUI, default .comfyui) and the pack loaded by its loader.

Order matters, so it all happens at import time of this conftest, before any test module:

1. ComfyUI's root goes *first* on ``sys.path``: its ``nodes.py`` must win over the pack's
   ``nodes/`` package, which ``pytest.ini``'s ``pythonpath = ..`` makes importable too.
2. ``comfy.cli_args.args.cpu = True`` before anything imports ``comfy.model_management``
   (a CUDA torch build on a GPU-less machine fails in ``get_torch_device`` otherwise).
3. The pack is loaded by ComfyUI's own ``nodes.load_custom_node`` from ``custom_nodes/comfyui_lorax``,
   never as a top-level ``nodes`` module. Its modules live under ComfyUI's name for it
   (:data:`PACK`); its ``lorax_core`` is a different module object from the ``lorax_core`` the
   unit tests import, so exception types are taken from the pack (:func:`pack_module`).

A missing host is a failure with a clear message, never a skip (CI builds the host).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
COMFY_ROOT = Path(os.environ.get("LORAX_COMFYUI", REPO / ".comfyui")).resolve()
PACK_LINK = COMFY_ROOT / "custom_nodes" / "comfyui_lorax"

if not (COMFY_ROOT / "main.py").is_file() or not PACK_LINK.exists():
    raise pytest.UsageError(
        f"ComfyUI host not found at {COMFY_ROOT} (or the pack is not linked at {PACK_LINK}); "
        "run `bash scripts/setup.sh` or set LORAX_COMFYUI. These tests are never skipped."
    )
if "nodes" in sys.modules and not str(getattr(sys.modules["nodes"], "__file__", "")).startswith(str(COMFY_ROOT)):
    raise pytest.UsageError(
        "a module named 'nodes' that is not ComfyUI's was imported before tests/nodes (the pack's nodes/ "
        "package imported as a top-level module?); run tests/nodes in a process that does not do that."
    )
sys.path.insert(0, str(COMFY_ROOT))

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True

import nodes as comfy_nodes  # noqa: E402


def _load_pack() -> str:
    """Load the pack with ComfyUI's loader; return the module name ComfyUI registered it under."""
    ok = asyncio.run(comfy_nodes.load_custom_node(str(PACK_LINK)))
    if not ok:
        raise pytest.UsageError(f"ComfyUI could not load the pack from {PACK_LINK}; see the log above.")
    return str(PACK_LINK).replace(".", "_x_")


PACK = _load_pack()


def pack_module(name: str) -> ModuleType:
    """A module of the pack as ComfyUI loaded it, e.g. ``pack_module("lorax_core.errors")``."""
    return importlib.import_module(f"{PACK}.{name}")


def leftovers(model) -> list[str]:
    """Weight functions and checkpointed forwards a training node left on the (shared) modules of ``model``."""
    out = []
    for name, module in model.model.named_modules():
        out.extend(f"{name}.{attr}" for attr in ("weight_function", "bias_function") if getattr(module, attr, None))
        if hasattr(module, "org_forward"):
            out.append(f"{name}.org_forward")
    return out
