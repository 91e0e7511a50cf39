"""`python -m lorax_core` end to end, in subprocesses, on tiny synthetic models."""

from __future__ import annotations

import json

from _cli_helpers import run_cli
from safetensors import safe_open

from lorax_core.formats import read_lora


def test_transfer_writes_source_style_lora_report_and_metadata(files):
    out, report = files.dir / "out.safetensors", files.dir / "report.json"
    proc = run_cli("transfer", "--source", files.source, "--target", files.target, "--lora", files.lora,
                   "--out", out, "--rank", 16, "--report", report, cwd=files.dir)  # fmt: skip

    assert proc.returncode == 0, proc.stderr
    assert "9 of 9 layers transferred" in proc.stdout
    with safe_open(str(files.lora), framework="pt") as a, safe_open(str(out), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())  # kohya names and alpha keys preserved
    result = read_lora(out)
    assert result.format == "kohya"
    meta = result.metadata
    assert meta["lorax.method"] == "auto" and meta["lorax.rank"] == "16" and meta["lorax.threshold"] == "0.5"
    assert meta["lorax.transferred"] == "9" and meta["lorax.skipped"] == "0"
    assert meta["lorax.source_model"] == "source.safetensors" and meta["lorax.target_model"] == "target.safetensors"
    assert len(meta["lorax.source_fingerprint"]) == len(meta["lorax.target_fingerprint"]) == 16
    assert meta["lorax.source_fingerprint"] != meta["lorax.target_fingerprint"]
    assert meta["lorax.tool_version"]
    assert meta["ss_tag_frequency"] == "{}"  # the source's training metadata is kept
    data = json.loads(report.read_text())
    assert data["totals"]["transferred"] == 9
    assert {layer["key"] for layer in data["layers"]} == set(result.layers)
    assert all(layer["phi_left"] is not None for layer in data["layers"])


def test_similarity_prints_table_and_json(files):
    out = files.dir / "sim.json"
    proc = run_cli("similarity", "--source", files.source, "--target", files.target, "--lora", files.lora,
                   "--rank", 16, "--json", out, "--no-cache", cwd=files.dir)  # fmt: skip

    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:6] == ["layer", "Φ_left", "Φ_right", "chance", "threshold", "verdict"]
    assert any(line.startswith("lora_unet_input_blocks_1_1_proj_in ") and line.endswith("pass") for line in lines)
    assert lines[-1] == "9 of 9 layers pass."
    data = json.loads(out.read_text())
    assert data["pairs"] == 9 and data["passed"] == 9


def test_inspect_lora(files):
    proc = run_cli("inspect", files.lora, cwd=files.dir)

    assert proc.returncode == 0, proc.stderr
    assert "format: kohya" in proc.stdout and "layers: 9" in proc.stdout and "conv layers: 2" in proc.stdout


def test_missing_file_exits_2_with_one_line(files):
    proc = run_cli("transfer", "--source", files.dir / "nope.safetensors", "--target", files.target,
                   "--lora", files.lora, "--out", files.dir / "o.safetensors", cwd=files.dir)  # fmt: skip

    assert proc.returncode == 2
    assert proc.stderr == (
        f"lorax_core transfer: error: {files.dir / 'nope.safetensors'}: no such file; check the path.\n"
    )
    assert not (files.dir / "o.safetensors").exists()
