"""The registry metadata in ``pyproject.toml`` is consistent (issue 12 item 8; docs/RELEASING.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lorax_core.version import TOOL_VERSION

ROOT = Path(__file__).resolve().parents[2]
tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _requirements(name: str) -> list[str]:
    lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_node_id_follows_the_registry_rules(project) -> None:
    name = project["project"]["name"]
    # docs.comfy.org/registry/specifications: < 100 chars, alphanumerics/-/_/., no consecutive
    # special characters, starts with a letter, and should not contain "ComfyUI".
    assert len(name) < 100
    assert re.fullmatch(r"[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*", name), name
    assert "comfyui" not in name.lower()


def test_version_is_the_tool_version(project) -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["project"]["version"])
    assert project["project"]["version"] == TOOL_VERSION


def test_registry_ids_are_set_and_consistent(project) -> None:
    comfy = project["tool"]["comfy"]
    repo = project["project"]["urls"]["Repository"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repo)
    # The icon URL points into this repository, at a file that exists.
    icon = comfy["Icon"]
    prefix = repo.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    assert icon.startswith(prefix), icon
    assert (ROOT / icon[len(prefix) :]).is_file()
    assert (ROOT / project["project"]["license"]["file"]).is_file()
    # The publish workflow only runs in the repository that owns the publisher.
    workflow = (ROOT / ".github" / "workflows" / "publish.yml").read_text(encoding="utf-8")
    assert "Comfy-Org/publish-node-action" in workflow
    assert f"github.repository_owner == '{repo.split('/')[3]}'" in workflow


def test_dependency_lists_mirror_the_requirements_files(project) -> None:
    assert sorted(project["project"]["dependencies"]) == sorted(_requirements("requirements.txt"))
    assert sorted(project["project"]["optional-dependencies"]["dev"]) == sorted(_requirements("requirements-dev.txt"))


def test_bump_version_rewrites_both_places(tmp_path, monkeypatch) -> None:
    from scripts import bump_version

    for path, _ in bump_version.PLACES:
        (tmp_path / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    places = tuple((tmp_path / path.name, pattern) for path, pattern in bump_version.PLACES)
    monkeypatch.setattr(bump_version, "PLACES", places)
    monkeypatch.setattr(bump_version, "ROOT", tmp_path)
    assert bump_version.main(["9.8.7"]) == 0
    assert 'version = "9.8.7"' in (tmp_path / "pyproject.toml").read_text(encoding="utf-8")
    assert 'TOOL_VERSION = "9.8.7"' in (tmp_path / "version.py").read_text(encoding="utf-8")
    assert bump_version.main(["v1"]) == 2
