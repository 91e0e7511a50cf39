"""LoRAs written by the real tools (diffusers, PEFT, transformers 5) transfer, and load back in them and in ComfyUI.

Files come from tests/formats/_ecosystem_helpers.py (made by the libraries' own code, cached under
out/.cache/); models are the tiny SD1.5 set of scripts/make_tiny_models.py (ComfyUI detects it as
SD15) and a diffusers-layout UNet ComfyUI detects as SD15. Every transfer runs the CLI in-process
with ``--comfyui`` (the real ComfyUI at ``LORAX_COMFYUI``, default ``.comfyui``; never skipped).

What is checked, per file: how many layers transfer (all of them), that diffusers (or PEFT) loads
the output with no missing key and the same ΔW per layer as the pack reads from it (so the scale
and the rewritten ``lora_adapter_metadata`` agree), and how many layers ComfyUI's stock loader
takes from the output as written and from a ``--style comfy`` output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _ecosystem_helpers import (
    CACHE,
    LDM_UNET,
    SD15_DIFFUSERS_UNET,
    comfy_patches,
    diffusers_deltas,
    peft_model_deltas,
    read_file,
    write_ecosystem_files,
)

from lorax_core.cli import _comfyui_key_map, main
from lorax_core.formats import read_lora
from lorax_core.formats.keys import ADAPTER_METADATA_KEY
from lorax_core.library import EXIT_PARTIAL
from lorax_core.types import LoraFactors

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
COMFYUI = Path(os.environ.get("LORAX_COMFYUI", ROOT / ".comfyui")).resolve()
SUBSPACE_CACHE = CACHE / "subspaces"

# file → (layers in it, has a text encoder, loader that reads it back)
LDM_ROWS: dict[str, tuple[int, bool, str]] = {
    "pipeline_meta": (60, True, "diffusers"),
    "pipeline_nometa": (60, True, "diffusers"),
    "kohya": (60, True, "diffusers"),
    "model_level": (48, False, "diffusers"),
    "peft_model": (48, False, "peft"),
}


@pytest.fixture(scope="module")
def files() -> dict[str, Path]:
    if not (COMFYUI / "comfy" / "lora.py").is_file():
        pytest.fail(f"ComfyUI not found at {COMFYUI}: run `bash scripts/setup.sh` or set LORAX_COMFYUI.")
    return write_ecosystem_files()


@pytest.fixture(scope="module")
def tiny() -> Any:
    from scripts.make_tiny_models import make_tiny_models

    return make_tiny_models()


@pytest.fixture(scope="module")
def ldm_key_map(tiny: Any) -> dict[str, Any]:
    return _comfyui_key_map(COMFYUI, tiny.source_checkpoint)[0]


def _transfer(source: Path, target: Path, lora: Path, out: Path, *extra: str) -> dict[str, Any]:
    report = out.with_suffix(".json")
    argv = ["transfer", "--source", source, "--target", target, "--lora", lora, "--out", out, "--report", report]
    argv += ["--comfyui", COMFYUI, "--rank", "16", "--cache-dir", SUBSPACE_CACHE, "--quiet", *extra]
    assert main([str(a) for a in argv]) in (0, EXIT_PARTIAL)  # callers check the skipped layers themselves
    return json.loads(report.read_text())["totals"]


def _lorax_norms(path: Path) -> list[float]:
    """‖ΔW‖ per layer as the pack reads the file (scale from alpha or lora_adapter_metadata), sorted."""
    lora = read_lora(path)
    assert not lora.unsupported, lora.unsupported
    norms = []
    for layer in lora.layers.values():
        assert isinstance(layer, LoraFactors)
        norms.append(float(layer.scale * (layer.up2d().double() @ layer.down2d().double()).norm()))
    return sorted(norms)


def _norms(deltas: dict[str, torch.Tensor]) -> list[float]:
    return sorted(float(d.norm()) for d in deltas.values())


def _load_back(row: str, path: Path, unet_config: dict[str, Any], text_encoder: bool) -> dict[str, torch.Tensor]:
    if row == "peft_model":
        deltas, missing = peft_model_deltas(path, unet_config)
        assert missing == []
        return deltas
    return diffusers_deltas(path, unet_config, text_encoder=text_encoder)


@pytest.mark.parametrize("row", ["pipeline_meta", "pipeline_nometa", "model_level"])
def test_reads_the_scale_diffusers_applies(files: dict[str, Path], row: str) -> None:
    """Item 2 (read): ΔW per layer as diffusers loads the source file = as the pack reads it."""
    _, text_encoder, _ = LDM_ROWS[row]
    theirs = _norms(diffusers_deltas(files[row], LDM_UNET, text_encoder=text_encoder))
    assert _lorax_norms(files[row]) == pytest.approx(theirs, rel=1e-4)


@pytest.mark.parametrize("row", list(LDM_ROWS))
def test_ldm_checkpoint_round_trip(
    files: dict[str, Path], tiny: Any, ldm_key_map: dict[str, Any], tmp_path: Path, row: str
) -> None:
    """Items 1 and 3: every UNet attention layer and every transformers-5 text-encoder layer transfers."""
    layers, text_encoder, loader = LDM_ROWS[row]
    out = tmp_path / f"{row}.safetensors"
    totals = _transfer(tiny.source_checkpoint, tiny.target_checkpoint, files[row], out)
    assert (totals["transferred"], totals["skipped"]) == (layers, 0)

    back = _load_back(row, out, LDM_UNET, text_encoder)
    assert len(back) == layers
    assert _norms(back) == pytest.approx(_lorax_norms(out), rel=1e-3)

    comfy_in, comfy_out = comfy_patches(files[row], ldm_key_map), comfy_patches(out, ldm_key_map)
    assert len(comfy_out) == len(comfy_in)  # as written: ComfyUI takes what it took from the source file
    comfy_style = tmp_path / f"{row}_comfy.safetensors"
    _transfer(tiny.source_checkpoint, tiny.target_checkpoint, files[row], comfy_style, "--style", "comfy")
    patches = comfy_patches(comfy_style, ldm_key_map)
    assert len(patches) == layers
    assert _norms(patches) == pytest.approx(_lorax_norms(comfy_style), rel=1e-3)
    print(
        f"\nTABLE {row} | ldm checkpoint | {totals['transferred']}/{layers} | {loader} {len(back)}/{layers} | "
        f"ComfyUI as written {len(comfy_out)}/{layers} (source file {len(comfy_in)}/{layers}) | "
        f"ComfyUI --style comfy {len(patches)}/{layers}"
    )


@pytest.mark.parametrize("extra", [("--output-rank", "2"), ("--method", "prolora")], ids=["output-rank", "prolora"])
def test_rewritten_adapter_metadata_loads_in_diffusers(
    files: dict[str, Path], tiny: Any, tmp_path: Path, extra: tuple[str, str]
) -> None:
    """Item 2 (write): the metadata describes the written ranks, with lora_alpha = r (the scale is in lora_B)."""
    out = tmp_path / "out.safetensors"
    totals = _transfer(tiny.source_checkpoint, tiny.target_checkpoint, files["pipeline_meta"], out, *extra)
    assert totals["skipped"] == 0
    tensors, metadata = read_file(out)
    fields = json.loads(metadata[ADAPTER_METADATA_KEY])
    for part in ("unet", "text_encoder"):
        ranks = {int(t.shape[0]) for k, t in tensors.items() if k.startswith(f"{part}.") and ".lora_A." in k}
        assert fields[f"{part}.r"] == fields[f"{part}.lora_alpha"]
        assert ranks == {fields[f"{part}.r"], *fields[f"{part}.rank_pattern"].values()}
        if extra[0] == "--output-rank":
            assert ranks == {2}
    back = diffusers_deltas(out, LDM_UNET, text_encoder=True)  # raises on a rank/metadata size mismatch
    assert len(back) == 60
    assert _norms(back) == pytest.approx(_lorax_norms(out), rel=1e-3)


def test_kohya_style_output_drops_adapter_metadata(files: dict[str, Path], tiny: Any, tmp_path: Path) -> None:
    """diffusers refuses alphas together with lora_adapter_metadata, so a --style comfy output has none."""
    out = tmp_path / "out.safetensors"
    _transfer(tiny.source_checkpoint, tiny.target_checkpoint, files["pipeline_meta"], out, "--style", "comfy")
    _, metadata = read_file(out)
    assert ADAPTER_METADATA_KEY not in metadata


def test_diffusers_layout_unet(files: dict[str, Path], tmp_path: Path) -> None:
    """Item 4: --comfyui accepts a diffusion_pytorch_model.safetensors and maps all 192 layers."""
    key_map, _ = _comfyui_key_map(COMFYUI, files["diffusers_source"])
    assert (
        key_map["unet.down_blocks.0.attentions.0.proj_in"]
        == "diffusion_model.down_blocks.0.attentions.0.proj_in.weight"
    )
    out = tmp_path / "out.safetensors"
    totals = _transfer(files["diffusers_source"], files["diffusers_target"], files["diffusers_unet_lora"], out)
    assert (totals["transferred"], totals["skipped"]) == (192, 0)
    back = diffusers_deltas(out, SD15_DIFFUSERS_UNET, text_encoder=False)
    assert len(back) == 192
    assert _norms(back) == pytest.approx(_lorax_norms(out), rel=1e-3)
    comfy_out = comfy_patches(out, key_map)
    print(
        f"\nTABLE diffusers_unet_lora | diffusers UNet | {totals['transferred']}/192 | diffusers {len(back)}/192 | "
        f"ComfyUI as written {len(comfy_out)}/192"
    )


def test_comfyui_from_a_python_without_its_dependencies(tmp_path: Path, tiny: Any) -> None:
    """Item 4: the message names the Python that lacks ComfyUI's dependencies, not the model file."""
    fake = tmp_path / "ComfyUI"
    (fake / "comfy").mkdir(parents=True)
    (fake / "comfy" / "__init__.py").write_text("")
    (fake / "comfy" / "lora.py").write_text("")
    (fake / "comfy" / "cli_args.py").write_text("import lorax_test_missing_dependency\n")
    out = tmp_path / "out.safetensors"
    argv = ["transfer", "--source", tiny.source_unet, "--target", tiny.target_unet, "--lora", tiny.lora, "--out", out]
    proc = subprocess.run(
        [sys.executable, "-m", "lorax_core", *map(str, argv), "--comfyui", str(fake)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "cannot import ComfyUI" in proc.stderr
    assert sys.executable in proc.stderr
    assert "lorax_test_missing_dependency" in proc.stderr
    assert "the Python that runs ComfyUI" in proc.stderr
    assert "base model file" not in proc.stderr
    assert not out.exists()
