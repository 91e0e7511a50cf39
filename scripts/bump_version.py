"""Set the pack's version in its two places: ``pyproject.toml`` and ``TOOL_VERSION``.

The registry publishes ``[project].version``; every output file records ``TOOL_VERSION``
(``lorax.tool_version``). ``tests/unit/test_packaging.py`` fails when they differ.

Usage::

    python scripts/bump_version.py 0.2.0
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLACES = (
    (ROOT / "pyproject.toml", re.compile(r'^(version = ")[^"]+(")$', re.MULTILINE)),
    (ROOT / "lorax_core" / "version.py", re.compile(r'^(TOOL_VERSION = ")[^"]+(")$', re.MULTILINE)),
)
SEMVER = re.compile(r"\d+\.\d+\.\d+")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not SEMVER.fullmatch(args[0]):
        print("usage: python scripts/bump_version.py X.Y.Z (semantic version, as the Comfy Registry requires)",
              file=sys.stderr)  # fmt: skip
        return 2
    for path, pattern in PLACES:
        text = path.read_text(encoding="utf-8")
        new, count = pattern.subn(rf"\g<1>{args[0]}\g<2>", text, count=1)
        if count != 1:
            print(f"{path}: no version line found", file=sys.stderr)
            return 2
        path.write_text(new, encoding="utf-8")
        print(f"{path.relative_to(ROOT)}: {args[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
