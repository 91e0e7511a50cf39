"""docs/ARCHITECTURE.md's file table is true: every module of the pack is listed, and no listed file is a ghost.

The table is the first fenced block of the page. A top-level folder starts at column 0
(``lorax_core/``, ``nodes/``); a sub-folder (``formats/``) is indented under it; file names are
the ``*.py`` / ``*.js`` words on its lines. A new module without a line in the table, or a line
naming a module that was moved or deleted, fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
#: Folders whose every source file must be in the table (the others are listed as a whole).
CHECKED = ("lorax_core", "nodes", "web/js")
_FILE = re.compile(r"(?<![\w/.])([A-Za-z_][\w]*\.(?:py|js))\b")


def table() -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index("```\n") + 4
    return text[start : text.index("```", start)]


def listed(block: str) -> dict[str, set[str]]:
    """``{folder: file names}`` as the table lists them (``lorax_core/formats`` for the indented sub-folder).

    The name column is what comes before the first run of two spaces; its indent says the level:
    0 a top folder or a file path, 2 a file (or a sub-folder) of the top folder, 4 a file of the
    sub-folder. Deeper lines continue a description and list nothing.
    """
    out: dict[str, set[str]] = {}
    top = sub = ""
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        names = re.split(r"\s{2,}", line.strip())[0]
        if not names or indent not in (0, 2, 4):
            continue
        if indent == 0:
            if names.endswith("/"):
                top, sub = names.rstrip("/"), ""
                continue
            top, sub = str(Path(names).parent), ""
            out.setdefault(top, set()).add(Path(names).name)
            continue
        if indent == 2:
            sub = names.rstrip("/") if names.endswith("/") else ""
            if sub:
                continue
        folder = f"{top}/{sub}" if indent == 4 else top
        out.setdefault(folder, set()).update(_FILE.findall(names))
    return out


def present(folder: str) -> set[str]:
    path = ROOT / folder
    return {p.name for p in path.iterdir() if p.suffix in (".py", ".js")}


def test_every_module_is_listed_and_no_listed_module_is_a_ghost() -> None:
    found = listed(table())
    folders = set(CHECKED) | {
        f"lorax_core/{p.name}" for p in (ROOT / "lorax_core").iterdir() if p.is_dir() and (p / "__init__.py").exists()
    }
    for folder in sorted(folders):
        have, doc = present(folder), found.get(folder, set())
        assert not have - doc, f"docs/ARCHITECTURE.md does not list {sorted(have - doc)} in {folder}/; add a line each"
        assert not doc - have, f"docs/ARCHITECTURE.md lists {sorted(doc - have)} in {folder}/, which do not exist"


def test_the_parser_sees_a_missing_and_a_ghost_module() -> None:
    block = "lorax_core/   core\n  a.py   one\n  formats/   handlers\n    b.py   two\nnodes/   n\n  c.py d.py   both\nweb/js/x.js  ui\n"
    assert listed(block) == {
        "lorax_core": {"a.py"},
        "lorax_core/formats": {"b.py"},
        "nodes": {"c.py", "d.py"},
        "web/js": {"x.js"},
    }
