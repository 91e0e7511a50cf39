"""lorax_core is host-free: importing it must not load ComfyUI or its globals (STYLE.md rule 1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOST_MODULES = ("comfy", "comfy_api", "comfy_execution", "folder_paths", "server", "execution", "nodes")


def _modules_after(statement: str) -> list[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _host(modules: list[str]) -> list[str]:
    return [m for m in modules if m.split(".")[0] in HOST_MODULES or m.startswith("comfy")]


def test_import_lorax_core_loads_no_host_module() -> None:
    modules = _modules_after("import lorax_core")
    assert "lorax_core" in modules
    assert _host(modules) == []


def test_engine_modules_load_no_host_module_and_no_scipy_until_matching() -> None:
    modules = _modules_after(
        "import lorax_core.transfer, lorax_core.similarity, lorax_core.matching, lorax_core.lorax_module"
    )
    assert _host(modules) == []
    # scipy is only needed once layers are matched by similarity (imported lazily there).
    assert not [m for m in modules if m.split(".")[0] == "scipy"]
