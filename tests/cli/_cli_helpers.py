"""Helpers for the CLI tests: the Files record and running ``python -m lorax_core`` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(FIXTURES))  # make_fixtures.py is a script, not a package


from make_fixtures import Files  # noqa: E402  (after the sys.path line above)

__all__ = ["FIXTURES", "ROOT", "Files", "run_cli"]


def run_cli(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m lorax_core ARGS`` in a subprocess, with the cache confined to ``cwd``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_CACHE_HOME=str(cwd / "cache"))
    return subprocess.run(
        [sys.executable, "-m", "lorax_core", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
