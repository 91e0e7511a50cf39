"""The DiT families on the command line (issue 22): ``python -m lorax_core transfer … --comfyui``.

The same tiny Flux.1 / SD3.5 / Wan 2.1 models and LoRAs as ``test_families_dit.py``
(``scripts/tiny_dit_families.py``), but through the CLI, whose key map comes from ComfyUI by
way of ``nodes/_comfy_keymap.py`` (a separate process; its JSON answer carries every kind of
key-map entry: whole weights, slices of fused weights, converted weights). Each output is
then loaded back with ComfyUI's stock LoRA loader (``comfy.sd.load_lora_for_models``, what
``LoraLoader`` calls) onto the target: every key loads (no "lora key not loaded" record) and
every transferred layer becomes a patch.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from comfy_harness import COMFY_ROOT, REPO
from safetensors.torch import load_file, save_file

from lorax_core.library import EXIT_PARTIAL
from scripts.tiny_dit_families import TinyDit, make_family

pytestmark = pytest.mark.comfy


def run_transfer(tiny: TinyDit, lora: Path, out: Path, *extra: object, target: Path | None = None):
    """``python -m lorax_core transfer`` with ``--comfyui`` on a family; ``(process, report dict)``."""
    report = out.with_suffix(".json")
    env = dict(os.environ, PYTHONPATH=str(REPO), XDG_CACHE_HOME=str(out.parent / "cache"))
    args = ["transfer", "--source", tiny.source, "--target", target or tiny.target, "--lora", lora, "--out", out,
            "--report", report, "--comfyui", COMFY_ROOT, "--no-cache", "--quiet", *extra]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "lorax_core", *map(str, args)],
        cwd=out.parent, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    # Exit status 3 is a partial transfer (some layers skipped); callers check the layers themselves.
    assert done.returncode in (0, EXIT_PARTIAL), done.stderr
    return done, json.loads(report.read_text())


def stock_load(model_file: Path, lora_file: Path, caplog, dtype: torch.dtype | None = None) -> dict[str, object]:
    """ComfyUI's stock loaders: the diffusion model, then the LoRA on it; ``{model key: patches}``."""
    import comfy.sd
    import comfy.utils

    model = comfy.sd.load_diffusion_model(str(model_file), model_options={"dtype": dtype} if dtype else {})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(lora_file)), 1.0, 0.0)
    not_loaded = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert not_loaded == [], not_loaded
    return dict(patched.patches)


def _transferred(report: dict) -> list[dict]:
    return [layer for layer in report["layers"] if layer["status"] == "transferred"]


@pytest.mark.parametrize("family", ["sd35", "wan"])
def test_cli_transfers_every_layer_and_the_stock_loader_loads_it(family, tmp_path, caplog):
    tiny = make_family(family)
    out = tmp_path / f"{family}.safetensors"
    done, report = run_transfer(tiny, tiny.loras["peft"], out)
    assert done.returncode == 0
    n_layers = len({k.rsplit(".", 2)[0] for k in load_file(str(tiny.loras["peft"]))})
    assert len(_transferred(report)) == len(report["layers"]) == n_layers
    patches = stock_load(tiny.target, out, caplog)
    # A fused qkv holds three patches (one per slice): count patches, not patched keys.
    assert sum(len(p) for p in patches.values()) == n_layers


def test_cli_sd35_identity_round_trip_and_a_converted_layer_is_reported(tmp_path):
    """target = source, exact: ΔW comes back; ``norm_out.linear`` (swap_scale_shift) is skipped with its reason."""
    tiny = make_family("sd35")
    lora = load_file(str(tiny.loras["peft"]))
    width = int(lora["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape[1])
    gen = torch.Generator().manual_seed(1)
    converted = (
        "transformer.norm_out.linear"  # ComfyUI: (final_layer.adaLN_modulation.1.weight, None, swap_scale_shift)
    )
    lora[f"{converted}.lora_A.weight"] = torch.randn(4, width, generator=gen).half()
    lora[f"{converted}.lora_B.weight"] = torch.randn(2 * width, 4, generator=gen).half()
    path = tmp_path / "with_norm_out.safetensors"
    save_file(lora, str(path))
    out = tmp_path / "identity.safetensors"
    done, report = run_transfer(tiny, path, out, "--method", "exact", target=tiny.source)
    assert done.returncode == EXIT_PARTIAL  # the converted layer is skipped
    skipped = [layer for layer in report["layers"] if layer["status"] != "transferred"]
    assert len(skipped) == 1 and skipped[0]["key"] == converted, skipped
    assert "swap_scale_shift" in skipped[0]["reason"] and "converted layers are not transferred" in skipped[0]["reason"]
    moved = load_file(str(out))
    names = {k.rsplit(".", 2)[0] for k in lora} - {converted}
    for name in names:
        want = lora[f"{name}.lora_B.weight"].float() @ lora[f"{name}.lora_A.weight"].float()
        up, down = moved[f"{name}.lora_B.weight"].float(), moved[f"{name}.lora_A.weight"].float()
        assert float((up @ down - want).norm() / want.norm()) <= 1e-3, name


@pytest.mark.slow
@pytest.mark.parametrize("style", ["peft", "kohya"])
def test_cli_flux_peft_slices_and_kohya_fused_weights(style, tmp_path, caplog):
    tiny = make_family("flux")
    out = tmp_path / f"flux_{style}.safetensors"
    # copy (asked by name) decomposes nothing: the 3072-wide plumbing, cheaply (see test_families_dit.py).
    _, report = run_transfer(tiny, tiny.loras[style], out, "--method", "copy")
    n_layers = len({k.rsplit(".", 2)[0] for k in load_file(str(tiny.loras[style]))})
    assert len(_transferred(report)) == len(report["layers"]) == n_layers
    if style == "peft":
        assert sum("[" in layer["source_key"] for layer in report["layers"]) == 10  # fused slices
    patches = stock_load(tiny.target, out, caplog, torch.float16)
    assert sum(len(p) for p in patches.values()) == n_layers


@pytest.mark.parametrize(("source_kind", "target_kind"), [("scaled_fp8", "Q8_0"), ("Q4_0", "fp8_e4m3fn")])
def test_cli_quantized_models_with_comfyui_key_map(source_kind, target_kind, tmp_path, caplog):
    """Scaled-fp8 / GGUF / fp8 files as source and target with ``--comfyui`` (ComfyUI detects the family from them)."""
    pytest.importorskip("gguf")
    from scripts.quantize_model import GGUF_TYPES, quantize_file

    tiny = make_family("wan")
    paths = {}
    for role, kind in (("source", source_kind), ("target", target_kind)):
        suffix = ".gguf" if kind in GGUF_TYPES else ".safetensors"
        paths[role] = quantize_file(getattr(tiny, role), tmp_path / f"{role}_{kind}{suffix}", kind)
    quant = TinyDit(tiny.family, tiny.root, paths["source"], paths["target"], tiny.loras)
    out = tmp_path / "moved.safetensors"
    _, report = run_transfer(quant, tiny.loras["peft"], out)
    n_layers = len({k.rsplit(".", 2)[0] for k in load_file(str(tiny.loras["peft"]))})
    assert len(_transferred(report)) == n_layers
    assert {v.dtype for k, v in load_file(str(out)).items()} == {torch.float16}  # the LoRA's dtype
    patches = stock_load(tiny.target, out, caplog)
    assert sum(len(p) for p in patches.values()) == n_layers
