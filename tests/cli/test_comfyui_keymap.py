"""``--comfyui PATH``: ComfyUI's own key tables resolve kohya LoRAs with diffusers block names.

Most real SD1.5/SDXL kohya LoRAs name layers after the diffusers UNet
(``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``), a layout only
ComfyUI's per-family tables translate (docs/FORMATS.md, "Resolving layer names"). These tests
run the real ComfyUI (``LORAX_COMFYUI``, default ``.comfyui``; never skipped) on a tiny model
it detects as SD15 (``comfy/model_detection.py``: one level, one res block, ``model_channels`` 320,
``context_dim`` 768, ``use_linear_in_transformer`` False).

The LoRA's names come from ComfyUI's ``model_lora_keys_unet`` on a model built here from the
known config — the reverse of what the CLI does, which must *detect* that config from the
file's header. Untouched weights are zeros (only their names and shapes matter to ComfyUI's
detection and to the transfer), so generating the 52 MB fp16 UNet stays cheap.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from _cli_helpers import ROOT, run_cli
from safetensors import safe_open
from safetensors.torch import save_file

from lorax_core.cli import _comfyui_key_map
from lorax_core.errors import FormatError, OptionError
from lorax_core.formats.resolve import NEEDS_COMFYUI
from lorax_core.library import EXIT_PARTIAL

# comfy: needs the host; slow: the fixture writes three 52 MB models and two tests start a ComfyUI import.
pytestmark = [pytest.mark.comfy, pytest.mark.slow]

COMFYUI = Path(os.environ.get("LORAX_COMFYUI", ROOT / ".comfyui")).resolve()
# The tiny SD15 UNet (``comfy/model_detection.py``): what ComfyUI's detect_unet_config derives from its keys.
UNET_CONFIG: dict[str, object] = {
    "image_size": 32, "in_channels": 4, "model_channels": 320, "out_channels": 4, "num_res_blocks": [1],
    "channel_mult": [1], "use_spatial_transformer": True, "transformer_depth": [1],
    "transformer_depth_output": [1, 1], "transformer_depth_middle": 1, "context_dim": 768,
    "use_linear_in_transformer": False, "legacy": False, "adm_in_channels": None,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}  # fmt: skip
# kohya LoRA layers: every diffusers-named UNet layer in these blocks, plus one text-encoder layer.
LORA_BLOCKS = ("lora_unet_down_blocks_0_attentions_0_", "lora_unet_mid_block_attentions_0_")
TE_LAYER = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
TE_FILE_KEY = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
TE_MODEL_KEY = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
LORA_RANK = 4
SIMILARITY_RANK = 16


@dataclass(frozen=True)
class ComfyFiles:
    """The generated files and, per LoRA layer name, the model key ComfyUI maps it to."""

    dir: Path
    source: Path  # full checkpoint: UNet + one CLIP-L layer
    target: Path
    source_unet: Path  # diffusion-model-only file, same UNet
    lora: Path
    expected: dict[str, str]  # {kohya layer name: lorax model key}


def _import_comfy() -> None:
    """Make the test's ComfyUI importable in CPU mode; fail (never skip) when it is missing."""
    if not (COMFYUI / "comfy" / "lora.py").is_file():
        pytest.fail(
            f"ComfyUI not found at {COMFYUI} (no comfy/lora.py): run `bash scripts/setup.sh` "
            "or set LORAX_COMFYUI to a ComfyUI root folder."
        )
    if str(COMFYUI) not in sys.path:
        sys.path.insert(0, str(COMFYUI))
    import comfy.cli_args  # noqa: TID251 -- the test drives the real host

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported (CUDA torch, no GPU)


def _sd15_unet_and_key_map() -> tuple[dict[str, tuple[int, ...]], dict[str, object]]:
    """UNet weight shapes (ComfyUI layout, no prefix) and ComfyUI's UNet LoRA key map, from the known config."""
    _import_comfy()
    import comfy.lora  # noqa: TID251 -- the test drives the real host
    import comfy.model_base  # noqa: TID251
    import comfy.supported_models  # noqa: TID251

    with torch.device("meta"):
        model = comfy.model_base.BaseModel(comfy.supported_models.SD15(UNET_CONFIG), device="meta")
    shapes = {
        k[len("diffusion_model.") :]: tuple(v.shape)
        for k, v in model.state_dict().items()
        if k.startswith("diffusion_model.")
    }
    return shapes, comfy.lora.model_lora_keys_unet(model, {})


def _spectral(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """An (m, n) float32 matrix with a smooth decaying spectrum (a trained layer's, not flat noise)."""
    d = min(m, n)
    p, _ = torch.linalg.qr(torch.randn(m, d, generator=gen))
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=gen))
    s = torch.exp(-4.0 * torch.arange(d, dtype=torch.float32) / d)
    return (p * s) @ q.T


def _finetune(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``w`` plus 5 % of its norm in a rank-2 update and noise: a fine-tune of the same base."""
    update = torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(2, w.shape[1], generator=gen)
    update = update + 0.3 * torch.randn(w.shape, generator=gen)
    return w + 0.05 * w.norm() * update / update.norm()


@pytest.fixture(scope="module")
def comfy_files(tmp_path_factory: pytest.TempPathFactory) -> ComfyFiles:
    shapes, unet_map = _sd15_unet_and_key_map()
    expected: dict[str, str] = {}
    for name, key in unet_map.items():
        if name.startswith(LORA_BLOCKS) and isinstance(key, str) and key.endswith(".weight"):
            shape = shapes[key[len("diffusion_model.") :]]
            if len(shape) == 2 or shape[2:] == (1, 1):
                expected[name] = key
    gen = torch.Generator().manual_seed(0)
    patched = {key[len("diffusion_model.") :] for key in expected.values()}
    source: dict[str, torch.Tensor] = {}
    target: dict[str, torch.Tensor] = {}
    for path, shape in shapes.items():
        if path in patched:
            w = _spectral(shape[0], shape[1], gen)
            source[path] = w.reshape(shape).half()
            target[path] = _finetune(w, gen).reshape(shape).half()
        else:
            source[path] = target[path] = torch.zeros(shape, dtype=torch.float16)
    te = _spectral(768, 768, gen)
    te_target = _finetune(te, gen)
    expected[TE_LAYER] = TE_MODEL_KEY

    lora: dict[str, torch.Tensor] = {}
    for name, key in expected.items():
        shape = (768, 768) if key == TE_MODEL_KEY else shapes[key[len("diffusion_model.") :]]
        conv = (1, 1) if len(shape) == 4 else ()
        lora[f"{name}.lora_down.weight"] = (torch.randn(LORA_RANK, shape[1], *conv, generator=gen) / 20).half()
        lora[f"{name}.lora_up.weight"] = (torch.randn(shape[0], LORA_RANK, *conv, generator=gen) / 20).half()
        lora[f"{name}.alpha"] = torch.tensor(float(LORA_RANK))

    d = tmp_path_factory.mktemp("comfyui_keymap")
    files = ComfyFiles(
        d, d / "source.safetensors", d / "target.safetensors", d / "source_unet.safetensors", d / "lora.safetensors",
        expected,
    )  # fmt: skip
    for path, unet, clip in ((files.source, source, te), (files.target, target, te_target)):
        checkpoint = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
        checkpoint[TE_FILE_KEY] = clip.half()
        save_file(checkpoint, str(path))
    save_file(source, str(files.source_unet))
    save_file(lora, str(files.lora), metadata={"ss_base_model_version": "sd_v1"})
    return files


def _transfer(files: ComfyFiles, out: str, *extra: object) -> tuple[int, str, dict[str, Any]]:
    """Run ``transfer`` (``--rank 16``) as a subprocess; ``(exit status, stderr, report JSON or {})``."""
    report = files.dir / f"{out}.json"
    result = run_cli(
        "transfer", "--source", files.source, "--target", files.target, "--lora", files.lora,
        "--out", files.dir / f"{out}.safetensors", "--report", report, "--rank", SIMILARITY_RANK, "--quiet",
        *extra, cwd=files.dir,
    )  # fmt: skip
    data = json.loads(report.read_text()) if report.exists() else {}
    return result.returncode, result.stderr, data


def test_comfyui_resolves_diffusers_block_names(comfy_files: ComfyFiles) -> None:
    unet_names = [n for n in comfy_files.expected if n.startswith("lora_unet_")]
    # The LoRA is diffusers-named through and through: 2 transformers × 12 layers incl. 1×1-conv proj_in/out.
    assert len(unet_names) == 24 and all(n.startswith(LORA_BLOCKS) for n in unet_names)

    code, err, report = _transfer(comfy_files, "out", "--comfyui", COMFYUI)
    assert code == 0, err

    layers = {entry["key"]: entry for entry in report["layers"]}
    assert set(layers) == set(comfy_files.expected)
    for name, key in comfy_files.expected.items():
        assert layers[name]["status"] == "transferred", layers[name]
        assert layers[name]["source_key"] == key
        assert layers[name]["phi_left"] > layers[name]["threshold"]
    assert report["totals"]["transferred"] == len(comfy_files.expected)

    with safe_open(str(comfy_files.dir / "out.safetensors"), framework="pt") as fh:
        written = set(fh.keys())
        up = fh.get_tensor("lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight")
    assert written == {
        f"{n}.{s}" for n in comfy_files.expected for s in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    assert up.shape[0] == 320 and up.shape[2:] == (1, 1)  # still a 1×1-conv kohya layer


def test_without_comfyui_points_to_the_option(comfy_files: ComfyFiles) -> None:
    code, err, report = _transfer(comfy_files, "plain")
    # The text-encoder layer resolves by its own name, so the run succeeds with the UNet layers skipped:
    # a partial transfer, exit status 3.
    assert code == EXIT_PARTIAL, err
    layers = {entry["key"]: entry for entry in report["layers"]}
    assert layers[TE_LAYER]["status"] == "transferred"
    unet = [entry for name, entry in layers.items() if name != TE_LAYER]
    assert len(unet) == 24
    for entry in unet:
        assert entry["status"] == "skipped" and entry["reason"] == NEEDS_COMFYUI
        assert "pass --comfyui PATH" in entry["reason"]


def test_key_map_of_diffusion_model_file(comfy_files: ComfyFiles) -> None:
    key_map, convert = _comfyui_key_map(COMFYUI, comfy_files.source_unet)
    for name, key in comfy_files.expected.items():
        if name.startswith("lora_unet_"):
            assert key_map[name] == key
    # No text encoder in a diffusion-model-only file, so no text-encoder targets.
    assert not any(str(v).startswith("text_encoders.") for v in key_map.values())
    assert convert is None  # no LoRA named: nothing to rename


def test_key_map_of_checkpoint_includes_text_encoder(comfy_files: ComfyFiles) -> None:
    key_map, _ = _comfyui_key_map(COMFYUI, comfy_files.source)
    assert key_map[TE_LAYER] == TE_MODEL_KEY
    assert key_map["lora_unet_down_blocks_0_attentions_0_proj_in"] == "diffusion_model.input_blocks.1.1.proj_in.weight"


def test_undetectable_model(files) -> None:
    # The other CLI tests' 64-wide model: SD-like key names, but no family ComfyUI knows.
    with pytest.raises(
        FormatError, match=rf"^--comfyui: ComfyUI does not recognise {re.escape(str(files.source))} as a model"
    ):
        _comfyui_key_map(COMFYUI, files.source)


def test_half_recognised_model(tmp_path: Path) -> None:
    # SD-style names, but a transformer block without its cross-attention: ComfyUI's detection trips.
    path = tmp_path / "half.safetensors"
    shapes = {
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (320,),
        "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    }
    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}, str(path))
    with pytest.raises(
        FormatError,
        match=rf"^--comfyui: ComfyUI could not build a key map for {re.escape(str(path))} \(KeyError: .*attn2\.to_k",
    ):
        _comfyui_key_map(COMFYUI, path)


def test_missing_bridge_module(files, monkeypatch, tmp_path: Path) -> None:
    # lorax_core reaches ComfyUI only through the pack's nodes/_comfy_keymap.py (it never imports
    # ComfyUI itself); a lorax_core copied out of the pack says what is missing.
    import lorax_core.cli as cli

    monkeypatch.setattr(cli, "COMFY_BRIDGE", tmp_path / "nodes" / "_comfy_keymap.py")
    with pytest.raises(
        OptionError, match=re.escape("--comfyui needs the pack's nodes/_comfy_keymap.py next to lorax_core")
    ):
        _comfyui_key_map(COMFYUI, files.source)


def _bridge_module() -> Any:
    """The pack's ``nodes/_comfy_keymap.py``, loaded by path (the pack's ``nodes`` is not importable by name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(  # noqa: TID251 -- tests may load host glue by path
        "lorax_test_comfy_keymap", ROOT / "nodes" / "_comfy_keymap.py"
    )
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_header_state_dict_reads_no_weights(comfy_files: ComfyFiles) -> None:
    state, _ = _bridge_module().header_state_dict(comfy_files.source)
    big = state["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight"]
    assert big.is_meta and big.shape == (2560, 320) and big.dtype == torch.float16
    bias = state["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.norm1.bias"]
    assert not bias.is_meta and bias.shape == (320,)  # small tensors carry values (some families test them)
    assert sum(t.numel() for t in state.values() if not t.is_meta) < 0.01 * sum(t.numel() for t in state.values())


def test_comfyui_option_keeps_comfy_out_of_the_core_process(comfy_files: ComfyFiles) -> None:
    # The key map comes from a separate process: the process running lorax_core never imports ComfyUI.
    code = (
        "import json, sys\n"
        "from lorax_core.cli import main\n"
        f"status = main(['similarity', '--source', {str(comfy_files.source)!r}, '--target', {str(comfy_files.target)!r}, "
        f"'--lora', {str(comfy_files.lora)!r}, '--rank', '{SIMILARITY_RANK}', '--comfyui', {str(COMFYUI)!r}])\n"
        "print(json.dumps([status, sorted(m for m in sys.modules if m.split('.')[0] in "
        "('comfy', 'comfy_api', 'folder_paths', 'nodes', 'server', 'execution'))]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    status, host_modules = json.loads(done.stdout.strip().splitlines()[-1])
    assert status == 0, done.stderr
    assert host_modules == []


def test_bridge_renames_a_lora_the_way_comfyui_converts_it(tmp_path: Path) -> None:
    # Wan "Fun" LoRAs are renamed by ComfyUI's convert_lora (lora_unet__ -> lora_unet_); the bridge
    # reports that as renames computed from the header, and the core applies them.
    from lorax_core.cli import _renamer

    _import_comfy()
    import comfy.lora_convert  # noqa: TID251 -- the test drives the real host

    lora = tmp_path / "wan_fun.safetensors"
    tensors = {
        "lora_unet__blocks_0_cross_attn_k.lora_down.weight": torch.ones(2, 8),
        "lora_unet__blocks_0_cross_attn_k.lora_up.weight": torch.ones(8, 2),
    }
    save_file(tensors, str(lora))
    renames, extra = _bridge_module().lora_renames(comfy.lora_convert.convert_lora, lora)
    assert renames == {
        "lora_unet_blocks_0_cross_attn_k.lora_down.weight": "lora_unet__blocks_0_cross_attn_k.lora_down.weight",
        "lora_unet_blocks_0_cross_attn_k.lora_up.weight": "lora_unet__blocks_0_cross_attn_k.lora_up.weight",
    }
    assert extra == {}
    converted = _renamer(renames, extra)(tensors)  # type: ignore[misc]
    assert set(converted) == set(comfy.lora_convert.convert_lora(dict(tensors)))
    # A LoRA whose names ComfyUI keeps needs no converter.
    plain = tmp_path / "plain.safetensors"
    save_file({"lora_unet_blocks_0_cross_attn_k.lora_down.weight": torch.ones(2, 8)}, str(plain))
    assert _bridge_module().lora_renames(comfy.lora_convert.convert_lora, plain) == (None, {})


def test_bridge_without_an_answer(files, monkeypatch, tmp_path: Path) -> None:
    # A bridge that dies (here: a stand-in that exits 1 with a traceback) gives one clear error.
    import lorax_core.cli as cli

    broken = tmp_path / "nodes" / "_comfy_keymap.py"
    broken.parent.mkdir()
    broken.write_text("import sys\nsys.stderr.write('Traceback: boom\\n')\nsys.exit(1)\n")
    monkeypatch.setattr(cli, "COMFY_BRIDGE", broken)
    with pytest.raises(
        OptionError, match=r"the pack's ComfyUI bridge \(.*\) gave no answer \(exit status 1: Traceback: boom\)"
    ):
        _comfyui_key_map(COMFYUI, files.source)
