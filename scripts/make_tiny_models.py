"""Generate tiny synthetic models that ComfyUI v0.3.75 detects as Stable Diffusion 1.5.

No real weights can be downloaded in CI, so the tests and the demo run on models made here:

* a one-level UNet (``model_channels`` 320, ``context_dim`` 768, one res block; 25.8 M
  parameters) built with ComfyUI's own ``UNetModel`` on the ``meta`` device, so the key names
  and shapes are exactly what ComfyUI expects and ``supported_models.SD15`` claims it
  (``comfy/model_detection.py`` ``detect_unet_config``);
* a full-size random CLIP-L text encoder (123 M parameters; ComfyUI's SD1 text encoder has a
  fixed config, so it cannot be shrunk) and a TAESD-shaped VAE (2.4 M parameters), so that a
  full checkpoint loads with ``CheckpointLoaderSimple`` and can sample an image;
* a "fine-tune" target = source + a small low-rank update + noise (what a real fine-tune of
  the same base looks like: the top singular subspaces move only a little);
* a kohya LoRA on the source's attention / feed-forward / ``proj_in``/``proj_out`` layers and
  two text-encoder blocks, and a LoRA of "another family" whose shapes fit nothing here;
* a second family: an SDXL-derivative UNet that ComfyUI detects as ``Segmind_Vega`` (three
  320-wide levels, transformer depths ``[0, 0, 1, 1, 2, 2]``, context 2048, ADM 2816; 115 M
  parameters) as UNet-only source/target files, with its own kohya LoRA. Its CLIP-L + CLIP-G
  text encoders (≈ 800 M parameters) are left out: the SDXL path is exercised on the UNet.

Matrices get decaying singular spectra like trained weights (random Gaussian matrices have
flat spectra, whose top subspaces are unstable under any perturbation). Everything is
seeded, so two runs write identical files; a stamp file marks a finished set and makes a
second run a no-op. Sizes (fp16): each SD1.5 checkpoint ≈ 300 MB, each SD1.5 UNet ≈ 52 MB, each Vega-like UNet ≈ 230 MB.

Usage::

    python scripts/make_tiny_models.py [--out DIR]     # default: out/.cache/tiny-models-v1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
GENERATOR_VERSION = "2"
DEFAULT_OUT = ROOT / "out" / ".cache" / f"tiny-models-v{GENERATOR_VERSION}"

# The kohya LoRA's rank and alpha (scale alpha / rank = 0.5, a common training setting).
LORA_RANK = 8
LORA_ALPHA = 4.0
# Text-encoder blocks the LoRA touches (kohya trains all 12; two keep the files small).
LORA_TE_LAYERS = (0, 1)
# Relative size of the fine-tune update (target = source + this · ‖W‖ · unit-norm update).
FINETUNE_EPS = 0.05


@dataclass(frozen=True)
class TinyModels:
    """Paths of one generated set. ``root`` is laid out like ComfyUI's ``models`` folder."""

    root: Path
    source_checkpoint: Path
    target_checkpoint: Path
    source_unet: Path
    target_unet: Path
    lora: Path
    foreign_lora: Path
    vega_source_unet: Path
    vega_target_unet: Path
    vega_lora: Path

    def relative(self, path: Path) -> str:
        """The name ComfyUI lists for ``path`` in its folder's combo (e.g. ``lorax_tiny_….safetensors``)."""
        return path.name


def _import_comfy() -> None:
    """Make ComfyUI importable (``LORAX_COMFYUI`` or the repo's ``.comfyui``) in CPU mode."""
    comfy_root = Path(os.environ.get("LORAX_COMFYUI", ROOT / ".comfyui")).resolve()
    if not (comfy_root / "comfy").is_dir():
        raise SystemExit(f"ComfyUI not found at {comfy_root}; run `bash scripts/setup.sh` or set LORAX_COMFYUI.")
    if str(comfy_root) not in sys.path:
        sys.path.insert(0, str(comfy_root))
    import comfy.cli_args

    # Must be set before comfy.model_management is imported: a CUDA torch build on a
    # GPU-less machine otherwise fails in get_torch_device().
    comfy.cli_args.args.cpu = True


def _meta_state_dicts() -> tuple[dict[str, torch.Tensor], ...]:
    """Key names and shapes (meta tensors) of the tiny UNet, CLIP-L, TAESD and Vega-like UNet, from ComfyUI's classes."""
    _import_comfy()
    import comfy.sd1_clip
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(
            image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
            channel_mult=[1], num_heads=8, use_spatial_transformer=True, transformer_depth=[1],
            transformer_depth_output=[1, 1], transformer_depth_middle=1, context_dim=768,
            use_linear_in_transformer=False, legacy=False, dtype=torch.float16,
        )
        clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16)
        taesd = comfy.taesd.taesd.TAESD()
        vega = UNetModel(
            image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[2, 2, 2],
            channel_mult=[1, 1, 1], num_heads=-1, num_head_channels=64, use_spatial_transformer=True,
            transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2],
            transformer_depth_middle=2, context_dim=2048, use_linear_in_transformer=True, legacy=False,
            adm_in_channels=2816, num_classes="sequential", dtype=torch.float16,
        )
    return unet.state_dict(), clip.state_dict(), taesd.state_dict(), vega.state_dict()


def _decaying(shape: tuple[int, ...], gen: torch.Generator, *, max_rank: int = 192) -> torch.Tensor:
    """A float32 weight of ``shape`` whose flattened singular values decay like ``1/(i+1)``.

    Built as ``A · diag(s) · B`` with Gaussian ``A`` (m, k), ``B`` (k, n) and k ≤ ``max_rank``
    (cheap: no QR, no m×n×min(m,n) product), plus a 1 % noise floor so the matrix is full rank.
    Scaled to the usual init size, ‖W‖_F ≈ sqrt(m).
    """
    m = shape[0]
    n = 1
    for d in shape[1:]:
        n *= d
    k = min(m, n, max_rank)
    s = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
    a = torch.randn(m, k, generator=gen)
    b = torch.randn(k, n, generator=gen)
    w = (a * s) @ b
    w = w / w.norm() * (m**0.5)
    w = w + 0.01 * (m**0.5) * torch.randn(m, n, generator=gen) / (m * n) ** 0.5
    return w.reshape(shape)


def _fill(meta: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random float32 values for every meta tensor: decaying spectra for matrices, LayerNorm-like 1-D."""
    out: dict[str, torch.Tensor] = {}
    for key, t in meta.items():
        shape = tuple(t.shape)
        if len(shape) >= 2 and "embedding" not in key:
            out[key] = _decaying(shape, gen)
        elif len(shape) >= 2:
            out[key] = 0.02 * torch.randn(shape, generator=gen)
        elif key.endswith(".weight") or key in ("logit_scale", "vae_scale"):
            # 1-D weights are all GroupNorm/LayerNorm gains here; scales start at 1.
            out[key] = torch.ones(shape)
        elif shape:
            out[key] = 0.01 * torch.randn(shape, generator=gen)
        else:
            out[key] = torch.zeros(shape)
    return out


def _finetune(weights: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A fine-tune-like copy: every matrix gets ``FINETUNE_EPS``·‖W‖ of (rank-4 update + noise)."""
    out = {}
    for key, w in weights.items():
        if w.ndim < 2 or "embedding" in key:
            out[key] = w.clone()
            continue
        flat = w.reshape(w.shape[0], -1)
        update = torch.randn(flat.shape[0], 4, generator=gen) @ torch.randn(4, flat.shape[1], generator=gen)
        update = update + 0.3 * torch.randn(flat.shape, generator=gen)
        out[key] = (flat + FINETUNE_EPS * flat.norm() * update / update.norm()).reshape(w.shape)
    return out


def _kohya_layer(prefix: str, out_dim: int, in_shape: tuple[int, ...], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One kohya layer: ``lora_down`` (r, in[, kh, kw]), ``lora_up`` (out, r[, 1, 1]), ``alpha``."""
    conv = len(in_shape) == 3
    fan_in = in_shape[0] * (in_shape[1] * in_shape[2] if conv else 1)
    down = torch.randn((LORA_RANK, *in_shape), generator=gen) / fan_in**0.5
    up = 0.05 * torch.randn((out_dim, LORA_RANK, 1, 1) if conv else (out_dim, LORA_RANK), generator=gen)
    return {
        f"{prefix}.lora_down.weight": down.to(torch.float16),
        f"{prefix}.lora_up.weight": up.to(torch.float16),
        f"{prefix}.alpha": torch.tensor(LORA_ALPHA),
    }


def _lora_targets(unet: dict[str, torch.Tensor]) -> list[str]:
    """UNet keys a kohya SD1.5 LoRA trains: attention, feed-forward, proj_in/proj_out."""
    wanted = (".attn1.to_", ".attn2.to_", ".ff.net.0.proj.", ".ff.net.2.", ".proj_in.", ".proj_out.")
    return [k for k in unet if k.endswith(".weight") and any(w in k for w in wanted) and unet[k].ndim >= 2]


def make_lora(unet: dict[str, torch.Tensor], clip: dict[str, torch.Tensor] | None,
              gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A kohya LoRA (``lora_unet_<ldm path>``, ``lora_te_text_model_…``) fitting the source's shapes."""
    sd: dict[str, torch.Tensor] = {}
    for key in _lora_targets(unet):
        name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        shape = tuple(unet[key].shape)
        sd.update(_kohya_layer(name, shape[0], shape[1:] if len(shape) == 4 else (shape[1],), gen))
    for i in LORA_TE_LAYERS if clip is not None else ():
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
            key = f"transformer.text_model.encoder.layers.{i}.{part}.weight"
            name = "lora_te_" + key[len("transformer.") : -len(".weight")].replace(".", "_")
            sd.update(_kohya_layer(name, clip[key].shape[0], (clip[key].shape[1],), gen))
    return sd


def make_foreign_lora(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A LoRA of another family (SDXL-like cross-attention: context 2048, width 640): nothing here fits it."""
    sd: dict[str, torch.Tensor] = {}
    for block in ("input_blocks_1_1", "output_blocks_0_1"):
        for part in ("attn2_to_k", "attn2_to_v"):
            sd.update(_kohya_layer(f"lora_unet_{block}_transformer_blocks_0_{part}", 640, (2048,), gen))
    return sd


def _half(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.to(torch.float16) if v.is_floating_point() and v.ndim > 0 else v).contiguous() for k, v in sd.items()}


def _checkpoint(unet: dict, clip: dict, taesd: dict) -> dict[str, torch.Tensor]:
    """An LDM-style SD1.5 checkpoint: ``model.diffusion_model.*``, ``cond_stage_model.*``, ``first_stage_model.*``."""
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    sd.update({f"cond_stage_model.{k}": v for k, v in clip.items() if k != "logit_scale"})
    sd.update({f"first_stage_model.{k}": v for k, v in taesd.items()})
    return _half(sd)


def paths(root: Path) -> TinyModels:
    """Where a generated set lives under ``root`` (files may not exist yet)."""
    return TinyModels(
        root=root,
        source_checkpoint=root / "checkpoints" / "lorax_tiny_sd15_source.safetensors",
        target_checkpoint=root / "checkpoints" / "lorax_tiny_sd15_target.safetensors",
        source_unet=root / "diffusion_models" / "lorax_tiny_sd15_source_unet.safetensors",
        target_unet=root / "diffusion_models" / "lorax_tiny_sd15_target_unet.safetensors",
        lora=root / "loras" / "lorax_tiny_sd15_lora.safetensors",
        foreign_lora=root / "loras" / "lorax_tiny_foreign_lora.safetensors",
        vega_source_unet=root / "diffusion_models" / "lorax_tiny_vega_source_unet.safetensors",
        vega_target_unet=root / "diffusion_models" / "lorax_tiny_vega_target_unet.safetensors",
        vega_lora=root / "loras" / "lorax_tiny_vega_lora.safetensors",
    )


def make_tiny_models(root: Path = DEFAULT_OUT, seed: int = 0) -> TinyModels:
    """Write the tiny model set under ``root`` (idempotent: a finished set is reused as is)."""
    models = paths(root)
    stamp = root / "done.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("seed") == seed:
        return models
    gen = torch.Generator().manual_seed(seed)
    unet_meta, clip_meta, taesd_meta, vega_meta = _meta_state_dicts()
    unet = _fill(unet_meta, gen)
    clip = _fill(clip_meta, gen)
    taesd = _fill(taesd_meta, gen)
    target_unet = _finetune(unet, gen)
    target_clip = _finetune(clip, gen)
    meta = {"generator": f"lorax make_tiny_models v{GENERATOR_VERSION}", "seed": str(seed)}
    for path in (models.source_checkpoint, models.source_unet, models.lora):
        path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_checkpoint(unet, clip, taesd), str(models.source_checkpoint), metadata=meta)
    save_file(_checkpoint(target_unet, target_clip, taesd), str(models.target_checkpoint), metadata=meta)
    save_file(_half(unet), str(models.source_unet), metadata=meta)
    save_file(_half(target_unet), str(models.target_unet), metadata=meta)
    lora_meta = meta | {"ss_network_dim": str(LORA_RANK), "ss_network_alpha": str(LORA_ALPHA), "ss_base_model_version": "sd_v1"}
    save_file(make_lora(unet, clip, gen), str(models.lora), metadata=lora_meta)
    save_file(make_foreign_lora(gen), str(models.foreign_lora), metadata=meta | {"ss_base_model_version": "sdxl_base_v1-0"})
    vega = _fill(vega_meta, gen)
    save_file(_half(vega), str(models.vega_source_unet), metadata=meta)
    save_file(_half(_finetune(vega, gen)), str(models.vega_target_unet), metadata=meta)
    save_file(make_lora(vega, None, gen), str(models.vega_lora), metadata=meta | {"ss_base_model_version": "sdxl_base_v1-0"})
    stamp.write_text(json.dumps({"seed": seed, "version": GENERATOR_VERSION}))
    return models


def run_maker(
    make: Callable[[Path, int], Any], what: str, description: str, default_out: Path, argv: list[str] | None
) -> int:
    """The command line of a tiny-model builder: ``--out FOLDER --seed N``, then ``make(out, seed)``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=default_out, help=f"output folder (default {default_out})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    models = make(args.out.resolve(), args.seed)
    print(f"{what} in {models.root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_maker(make_tiny_models, "tiny models", __doc__.split("\n\n")[0], DEFAULT_OUT, argv)


if __name__ == "__main__":
    sys.exit(main())
