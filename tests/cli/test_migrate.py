"""The folder migration (``migrate``, :mod:`lorax_core.library`): rows and reasons, outputs, summary,
resume, strict, exit codes, interruption, one decomposition per base weight, order independence."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _cli_helpers import FIXTURES, ROOT
from make_fixtures import kohya_lora, one_error_line
from safetensors import safe_open
from safetensors.torch import save_file

from lorax_core.cache import DiskCache
from lorax_core.cli import EXIT_INTERRUPTED, main
from lorax_core.library import EXIT_NOTHING, EXIT_OK, EXIT_PARTIAL, migrate_library
from lorax_core.modelio import open_model
from lorax_core.pipeline import file_model_info
from lorax_core.types import TransferOptions

GOLDEN = FIXTURES / "golden"


def migrate_args(files, lora_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["migrate", "--quiet", "--source", str(files.source), "--target", str(files.target), "--lora-dir",
            str(lora_dir), "--out-dir", str(out_dir), "--rank", "16", "--cache-dir", str(files.dir / "cache"),
            *extra]  # fmt: skip


def other_family_lora() -> dict[str, torch.Tensor]:
    """The kohya names of the tiny model, with every factor twice as wide: a LoRA for a bigger model of the family."""
    return {k: torch.cat([v, v], dim=-1) if k.endswith("lora_down.weight") else v for k, v in kohya_lora().items()}


def with_loha(seed: int = 1) -> dict[str, torch.Tensor]:
    return {**kohya_lora(seed), "lora_unet_input_blocks_1_1_proj_in.hada_w1_a": torch.ones(2, 2)}


def good_folder(root: Path, count: int = 2) -> list[Path]:
    paths = [root / "a.safetensors", root / "sub" / "b.safetensors", *[root / f"c{i}.safetensors" for i in range(count - 2)]]
    for i, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(kohya_lora(seed=i + 1), str(path), metadata={"ss_base_model_version": "sd_v1"})
    return paths


def mixed_folder(root: Path) -> None:
    good_folder(root)
    (root / "sub" / "deeper").mkdir(parents=True)
    save_file(with_loha(), str(root / "sub" / "deeper" / "partial.safetensors"))
    save_file(other_family_lora(), str(root / "bigger.safetensors"))
    shutil.copy(GOLDEN / "lycoris_mixed.safetensors", root / "lyco.safetensors")
    (root / "sub" / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    data = (root / "a.safetensors").read_bytes()
    (root / "sub" / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (root / "old.ckpt").write_bytes(b"a pickle, never loaded")
    (root / "a.preview.png").write_bytes(b"\x89PNG")


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_mixed_folder_gives_one_row_per_file_and_goes_on(files, capsys):
    loras, out = files.dir / "loras", files.dir / "out"
    mixed_folder(loras)
    assert main(migrate_args(files, loras, out)) == EXIT_PARTIAL
    captured = capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["file"]: r for r in summary["rows"]}
    assert {f: (r["outcome"], r["reason"]) for f, r in rows.items()} == {
        "a.safetensors": ("transferred", ""),
        "sub/b.safetensors": ("transferred", ""),
        "sub/deeper/partial.safetensors": ("partial", "partial"),
        "bigger.safetensors": ("failed", "other_family"),
        "lyco.safetensors": ("failed", "not_transferable"),
        "sub/garbage.safetensors": ("failed", "unreadable"),
        "sub/truncated.safetensors": ("failed", "unreadable"),
        "old.ckpt": ("failed", "pickle"),
    }
    assert "truncated" in rows["sub/truncated.safetensors"]["detail"]
    assert "pickle" in rows["old.ckpt"]["detail"]
    assert "none of its 6 layers could be used" in rows["lyco.safetensors"]["detail"]  # the core's message
    assert summary["ignored"] == ["a.preview.png"]
    assert summary["exit_status"] == EXIT_PARTIAL
    # Problems first: failed, then partial, then transferred.
    assert [r["outcome"] for r in summary["rows"]] == ["failed"] * 5 + ["partial"] + ["transferred"] * 2
    # Outputs at the same relative path, in the LoRA's own key style, each with its report beside it.
    for rel in ("a.safetensors", "sub/b.safetensors", "sub/deeper/partial.safetensors"):
        assert rows[rel]["output"] == rel
        assert all(k.startswith("lora_unet_") or k.startswith("lora_te_") for k in tensors_of(out / rel))
        report = json.loads((out / rel).with_suffix(".report.json").read_text())
        assert report["totals"]["layers"] == rows[rel]["layers"]
    good = rows["a.safetensors"]
    assert good["transferred"] == good["layers"] == 9 and good["mean_phi"] > 0.9 and sum(good["methods"].values()) == 9
    assert rows["sub/deeper/partial.safetensors"]["skipped"] == {"malformed_layer": 1}  # the lone LoHa tensor
    assert sorted(p.name for p in out.rglob("*.safetensors")) == ["a.safetensors", "b.safetensors", "partial.safetensors"]
    # The human summary: a table with problems first.
    table = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert table[0].startswith("| bigger.safetensors | failed (other_family)")
    assert table[-1].startswith("| sub/b.safetensors | transferred")
    # One line per file on stdout, and the warning on stderr.
    assert len(re.findall(r"^\[\s*\d/8\] ", captured.out, flags=re.M)) == 8
    assert "lorax migrate: WARNING: 8 LoRA files: 2 transferred, 1 partial, 5 failed" in captured.err


def test_rerun_resumes_and_a_changed_input_is_a_name_clash(files, capsys):
    loras, out = files.dir / "loras", files.dir / "out"
    paths = good_folder(loras)
    assert main(migrate_args(files, loras, out)) == EXIT_OK
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    capsys.readouterr()
    assert main(migrate_args(files, loras, out)) == EXIT_OK
    assert "up to date (kept)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamps
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["up_to_date"] == 2 and all(r["layers"] == 9 for r in summary["rows"])
    # An input newer than its output: not silently kept, not silently replaced.
    later = time.time() + 5
    os.utime(paths[0], (later, later))
    assert main(migrate_args(files, loras, out)) == EXIT_PARTIAL
    row = next(r for r in json.loads((out / "summary.json").read_text())["rows"] if r["file"] == "a.safetensors")
    assert row["reason"] == "name_clash" and "older than its input" in row["detail"]
    assert "move it away or pass --overwrite" in capsys.readouterr().out  # the CLI names its flag
    assert main([*migrate_args(files, loras, out), "--overwrite"]) == EXIT_OK
    assert (out / "a.safetensors").stat().st_mtime_ns != stamps[out / "a.safetensors"]


def test_strict_stops_at_the_first_problem(files, capsys):
    loras, out = files.dir / "loras", files.dir / "out"
    good_folder(loras)
    save_file(with_loha(), str(loras / "b_partial.safetensors"))  # sorts between a and sub/b
    assert main([*migrate_args(files, loras, out), "--strict"]) == EXIT_NOTHING
    line = one_error_line(capsys)
    assert line.startswith("lorax_core migrate: error: strict: stopped at b_partial.safetensors (strict;")
    assert (out / "a.safetensors").exists() and not (out / "b_partial.safetensors").exists()
    assert not (out / "sub" / "b.safetensors").exists()
    assert json.loads((out / "summary.json").read_text())["interrupted"] is True


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "no LoRA file under"),
        ("same", "is the LoRA folder"),
        ("missing", "does not exist or is not a folder"),
        ("holds_source", "holds the --source file"),
    ],
)
def test_nothing_can_run_is_status_2_with_one_line(files, capsys, case, message):
    loras = files.dir / "loras"
    loras.mkdir()
    out = {"same": loras, "holds_source": files.dir}.get(case, files.dir / "out")
    if case == "missing":
        loras = files.dir / "nowhere"
    assert main(migrate_args(files, loras, out)) == EXIT_NOTHING
    assert message in one_error_line(capsys)


def test_a_folder_of_bad_files_only_is_status_2(files, capsys):
    loras, out = files.dir / "loras", files.dir / "out"
    loras.mkdir()
    (loras / "x.pt").write_bytes(b"pickle")
    save_file(other_family_lora(), str(loras / "bigger.safetensors"))
    assert main(migrate_args(files, loras, out)) == EXIT_NOTHING
    assert json.loads((out / "summary.json").read_text())["counts"]["failed"] == 2


def test_pattern_filters_and_the_output_folder_inside_is_not_walked(files, capsys):
    loras = files.dir / "loras"
    good_folder(loras, count=3)
    out = loras / "migrated"
    assert main([*migrate_args(files, loras, out), "--pattern", "c*"]) == EXIT_OK
    assert [r["file"] for r in json.loads((out / "summary.json").read_text())["rows"]] == ["c0.safetensors"]
    assert main(migrate_args(files, loras, out)) == EXIT_OK  # outputs under loras/migrated are not inputs
    assert len(json.loads((out / "summary.json").read_text())["rows"]) == 3


def _migrate(files, loras: Path, out: Path, cache: object, **kw: object):
    source, target = open_model(files.source), open_model(files.target)
    return migrate_library(
        loras, out, source, target, TransferOptions(rank=16), source_info=file_model_info(source),
        target_info=file_model_info(target), host="test", cache=cache, **kw,
    )  # fmt: skip


class CountingCache(DiskCache):
    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.computed: list[str] = []

    def get_or_compute(self, fingerprint, key, rank, compute, *, method=None):
        def counted():
            self.computed.append(f"{fingerprint}:{key}")
            return compute()

        return super().get_or_compute(fingerprint, key, rank, counted, method=method)


def test_the_base_pair_is_decomposed_once_for_the_whole_folder(files):
    loras = files.dir / "loras"
    good_folder(loras, count=4)
    cache = CountingCache(files.dir / "cache")
    summary = _migrate(files, loras, files.dir / "out", cache)
    assert [r.outcome for r in summary.rows] == ["transferred"] * 4
    assert len(cache.computed) == len(set(cache.computed)) == 2 * 9  # each weight of each model, once


def test_a_result_does_not_depend_on_the_files_before_it(files):
    """The same LoRA twice: the first decomposes (a cache miss), the second reads the float16 cache."""
    loras = files.dir / "loras"
    loras.mkdir()
    save_file(kohya_lora(), str(loras / "a.safetensors"))
    save_file(kohya_lora(), str(loras / "z.safetensors"))
    _migrate(files, loras, files.dir / "out", DiskCache(files.dir / "cache"))
    a, z = tensors_of(files.dir / "out" / "a.safetensors"), tensors_of(files.dir / "out" / "z.safetensors")
    assert a.keys() == z.keys() and all(torch.equal(a[k], z[k]) for k in a)


def test_an_interrupted_run_leaves_no_half_written_file_and_resumes(files):
    loras, out = files.dir / "loras", files.dir / "out"
    good_folder(loras, count=3)
    def cancel_in_second_file(index: int, total: int, done: int, layers: int) -> None:
        if index == 1 and layers and done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _migrate(files, loras, out, DiskCache(files.dir / "cache"), progress=cancel_in_second_file)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "a.report.json", "a.safetensors", "summary.json", "summary.md"
    ]  # fmt: skip
    assert json.loads((out / "summary.json").read_text())["interrupted"] is True
    first = (out / "a.safetensors").stat().st_mtime_ns
    summary = _migrate(files, loras, out, DiskCache(files.dir / "cache"))
    assert [(r.file, r.resumed) for r in summary.rows] == [
        ("a.safetensors", True), ("c0.safetensors", False), ("sub/b.safetensors", False)
    ]  # fmt: skip
    assert (out / "a.safetensors").stat().st_mtime_ns == first and summary.exit_status() == EXIT_OK


def test_ctrl_c_is_one_line_and_status_130(files, capsys, monkeypatch):
    import lorax_core.cli as cli

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "migrate_library", interrupted)
    loras = files.dir / "loras"
    good_folder(loras)
    assert main(migrate_args(files, loras, files.dir / "out")) == EXIT_INTERRUPTED
    assert "interrupted; finished files are kept" in one_error_line(capsys)


def test_progress_lines_in_a_log(files, capsys, monkeypatch):
    import lorax_core.cli as cli

    monkeypatch.setattr(cli, "LOG_PROGRESS_INTERVAL_S", 0.0)
    loras = files.dir / "loras"
    good_folder(loras)
    argv = [a for a in migrate_args(files, loras, files.dir / "out") if a != "--quiet"]
    assert main(argv) == EXIT_OK
    err = capsys.readouterr().err
    assert re.search(r"^lorax_core: migrate: 2/2 files \(100%\)", err, flags=re.M), err


def _tiny_lora(seed: int) -> dict[str, torch.Tensor]:
    """Two layers of the tiny model's LoRA (a fast transfer)."""
    full = kohya_lora(seed, text_encoder=False)
    keep = sorted({k.split(".")[0] for k in full})[:2]
    return {k: v for k, v in full.items() if k.split(".")[0] in keep}


@pytest.mark.slow
def test_300_files_with_10_percent_bad_survive_a_kill_and_resume(files):
    """Issue 20's synthetic library: 0 crashes, every bad file a row with its reason, kill + resume, nothing written twice."""
    rng = random.Random(20)
    loras, out = files.dir / "loras", files.dir / "out"
    expected_bad: dict[str, str] = {}
    for i in range(300):
        rel = Path(f"set{i % 7}") / f"lora_{i:03d}.safetensors"
        path = loras / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if i % 10 == 3:
            kind = ("pickle", "unreadable", "other_family")[i // 10 % 3]
            if kind == "pickle":
                path, rel = path.with_suffix(".pt"), rel.with_suffix(".pt")
                path.write_bytes(b"pickle")
            elif kind == "unreadable":
                path.write_bytes(os.urandom(64))
            else:
                save_file(other_family_lora(), str(path))
            expected_bad[rel.as_posix()] = kind
        else:
            save_file(_tiny_lora(i), str(path))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", "lorax_core", *migrate_args(files, loras, out)]
    proc = subprocess.Popen(argv, cwd=files.dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Kill once some files are written, at a random point of the run.
    deadline = time.monotonic() + 240
    wanted = rng.randrange(20, 200)
    while time.monotonic() < deadline and proc.poll() is None and len(list(out.rglob("*.report.json"))) < wanted:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    written = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.safetensors")}
    assert written, "the run was killed before it wrote anything"
    for path in written:  # no half-written file: every visible output is complete, with its report
        assert tensors_of(path) and path.with_suffix(".report.json").exists()
    resumed = subprocess.run(argv, cwd=files.dir, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == EXIT_PARTIAL, resumed.stderr
    assert "Traceback" not in resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["file"]: r for r in summary["rows"]}
    assert len(rows) == 300
    assert {f: r["reason"] for f, r in rows.items() if r["outcome"] == "failed"} == expected_bad
    assert sum(r["resumed"] for r in rows.values()) == len(written)
    for path, stamp in written.items():  # kept, not written again
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp
    assert len(list(out.rglob("*.safetensors"))) == 300 - len(expected_bad)
