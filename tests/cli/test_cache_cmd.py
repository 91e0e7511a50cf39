"""`python -m lorax_core cache info|clear`: one line each, only the cache's own files touched."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from _cli_helpers import run_cli

from lorax_core.cache import DiskCache
from lorax_core.cli import cache_usage, main
from lorax_core.errors import OptionError
from lorax_core.linalg import top_subspace


def _fill(root: Path, count: int) -> int:
    """Write ``count`` real entries (64×48 weights, R = 8) into a DiskCache at ``root``; return their bytes."""
    cache = DiskCache(root)
    gen = torch.Generator().manual_seed(0)
    for i in range(count):
        weight = torch.randn(64, 48, generator=gen)
        cache.get_or_compute("fp-test", f"layer{i}.weight", 8, lambda w=weight: top_subspace(w, 8))
    return cache.total_bytes()


def _size_in_bytes(text: str) -> float:
    value, unit = re.search(r"([\d.]+) (B|KiB|MiB|GiB)", text).groups()
    return float(value) * {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[unit]


def test_info_reports_entries_size_and_folder(tmp_path):
    root = tmp_path / "subspaces"
    size = _fill(root, 3)
    proc = run_cli("cache", "info", "--cache-dir", root, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and str(root) in lines[0] and " 3 entries, " in lines[0]
    assert _size_in_bytes(lines[0].split("entries, ")[1]) == pytest.approx(size, rel=0.05)
    assert "limit 8.0 GiB" in lines[0]


def test_clear_removes_entries_and_leaves_other_files(tmp_path):
    root = tmp_path / "subspaces"
    _fill(root, 2)
    keep = root / "notes.txt"
    keep.write_text("not ours")
    proc = run_cli("cache", "clear", "--cache-dir", root, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1 and "removed 2 entries" in proc.stdout
    assert keep.read_text() == "not ours"
    assert cache_usage(root)[:2] == (0, 0)
    again = run_cli("cache", "info", "--cache-dir", root, cwd=tmp_path)
    assert " 0 entries, 0 B " in again.stdout


def test_missing_folder_is_reported_and_not_created(tmp_path):
    root = tmp_path / "never"
    for action in ("info", "clear"):
        proc = run_cli("cache", action, "--cache-dir", root, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"subspace cache {root}: no entries (the folder does not exist yet)"
    assert not root.exists()


def test_default_folder_follows_xdg_cache_home(tmp_path):
    # run_cli sets XDG_CACHE_HOME=<cwd>/cache, so the default folder is <cwd>/cache/lorax.
    root = tmp_path / "cache" / "lorax"
    _fill(root, 1)
    proc = run_cli("cache", "info", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"subspace cache {root}: 1 entry, ")


def test_a_file_as_cache_dir_is_one_line_error(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"x")
    proc = run_cli("cache", "clear", "--cache-dir", path, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert re.match(r"lorax_core cache: error: --cache-dir '.*file\.bin' is a file, not a folder; pass", proc.stderr)
    assert path.read_bytes() == b"x"


def test_file_as_cache_dir_raises_option_error_in_process(tmp_path):
    from lorax_core import cli

    path = tmp_path / "file.bin"
    path.write_bytes(b"x")
    args = cli.build_parser().parse_args(["cache", "info", "--cache-dir", str(path)])
    with pytest.raises(OptionError, match=r"^--cache-dir '.*file\.bin' is a file, not a folder; pass the cache folder"):
        cli._cmd_cache(args)
    assert main(["cache", "info", "--cache-dir", str(path)]) == 2


def test_unknown_action_is_a_usage_error(tmp_path):
    proc = run_cli("cache", "purge", cwd=tmp_path)
    assert proc.returncode == 2 and "invalid choice: 'purge'" in proc.stderr


def test_unusable_cache_folder_names_the_flag(files, tmp_path, capsys):
    # The core's CacheError speaks of the option ("turn the subspace cache off"); the CLI names its flag.
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder's parent should be")
    argv = ["similarity", "--source", str(files.source), "--target", str(files.target), "--cache-dir", str(blocker / "c")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.match(r"lorax_core similarity: error: subspace cache directory '.*c' cannot be created \(", err)
    assert err.rstrip().endswith("choose another directory or pass --no-cache.")
