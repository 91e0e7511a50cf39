"""lorax_core is host-free: importing it must not load ComfyUI or its globals (the project's first architecture rule, docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

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


# ---------------------------------------------------------------- path loading

CORE = ROOT / "lorax_core"
#: Calls that load code by path or change where imports are found: each would let lorax_core reach
#: the host (ComfyUI, or the pack's ``nodes/``) without an ``import`` the lint rule can see.
PATH_LOADERS = {
    "spec_from_file_location",
    "module_from_spec",
    "SourceFileLoader",
    "SourcelessFileLoader",
    "ExtensionFileLoader",
    "run_path",
    "run_module",
    "import_module",
    "__import__",
    "exec",
    "execfile",
    "addsitedir",
}
PATH_MUTATORS = {"insert", "append", "extend", "remove", "pop", "clear", "__setitem__", "__iadd__"}


def _is_sys_path(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr in ("path", "meta_path", "path_hooks")
        and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
    )


def path_loading_tricks(source: str, filename: str = "<source>") -> list[str]:
    """``file:line: what`` for every path-loading trick in ``source`` (an import the linter cannot see)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in PATH_LOADERS:
                found.append(f"{where}: calls {name}")
            if isinstance(func, ast.Attribute) and func.attr in PATH_MUTATORS and _is_sys_path(func.value):
                found.append(f"{where}: changes sys.{func.value.attr}")  # type: ignore[union-attr]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            )
            for name in names:
                if name.split(".")[0] in ("runpy", "imp") or name in ("importlib.machinery", "importlib.util"):
                    found.append(f"{where}: imports {name}")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                base = target.value if isinstance(target, ast.Subscript) else target
                if _is_sys_path(base):
                    found.append(f"{where}: assigns sys.{base.attr}")  # type: ignore[union-attr]
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute):
            # os.environ["PYTHONPATH"] = … makes every child process import from elsewhere.
            key = node.slice
            if isinstance(key, ast.Constant) and key.value == "PYTHONPATH":
                found.append(f"{where}: touches PYTHONPATH")
    return found


def test_lorax_core_loads_no_code_by_path() -> None:
    tricks: list[str] = []
    for path in sorted(CORE.rglob("*.py")):
        tricks += path_loading_tricks(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert tricks == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import importlib.util\nspec = importlib.util.spec_from_file_location('m', 'nodes/x.py')",
        "from importlib.machinery import SourceFileLoader",
        "import runpy\nrunpy.run_path('nodes/x.py')",
        "import importlib\nimportlib.import_module('comfy.lora')",
        "m = __import__('comfy')",
        "import sys\nsys.path.insert(0, '/ComfyUI')",
        "import sys\nsys.path.append('/ComfyUI')",
        "import sys\nsys.path[0] = '/ComfyUI'",
        "import sys\nsys.path += ['/ComfyUI']",
        "import sys\nsys.path = ['/ComfyUI']",
        "exec(open('nodes/x.py').read())",
        "import os\nos.environ['PYTHONPATH'] = '/ComfyUI'",
        "import site\nsite.addsitedir('/ComfyUI')",
    ],
)
def test_the_check_catches_each_trick(snippet: str) -> None:
    assert path_loading_tricks(snippet) != []


def test_the_check_allows_plain_code() -> None:
    plain = "import sys\nfrom pathlib import Path\nprint(sys.path[0], Path('a') / 'b')\nimport importlib.metadata\n"
    assert path_loading_tricks(plain) == []
