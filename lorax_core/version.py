"""The pack's name and version as every output file records them (``lorax.tool``, ``lorax.tool_version``).

``TOOL_VERSION`` is kept in step with ``pyproject.toml``'s ``[project].version`` by
``scripts/bump_version.py`` (``tests/unit/test_packaging.py`` fails when they differ).
"""

from __future__ import annotations

__all__ = ["TOOL_NAME", "TOOL_VERSION"]

TOOL_NAME = "lorax_core"
TOOL_VERSION = "0.1.0"
