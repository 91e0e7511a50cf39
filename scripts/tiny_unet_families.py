"""Tiny synthetic SDXL, SSD-1B-like and SD2.x models that ComfyUI v0.3.75 detects as those families.

Extends ``scripts/make_tiny_models.py`` (SD1.5, Segmind Vega) with the UNet families of issue 13,
built the same way: key names and shapes from ComfyUI's own classes on the ``meta`` device,
decaying-spectrum values, a fine-tune-like target, kohya LoRAs.

* **SDXL full checkpoint** (detected as ``SDXL``): ComfyUI matches SDXL on ``model_channels``
  320, linear ``proj_in``, input transformer depths ``[0, 0, 2, 2, 10, 10]``, context 2048 and
  ADM 2816 only, so every level here is 320 wide (``channel_mult`` ``[1, 1, 1]``) and the
  output depths 0 and the middle depth 1 (≈ 130 M parameters instead of 2.6 G). Text encoders CLIP-L and
  OpenCLIP-G in the checkpoint's own layout (``conditioner.embedders.1.model.…`` with the fused
  ``attn.in_proj_weight``), written by ComfyUI's ``process_clip_state_dict_for_saving``.
  Only the text-encoder blocks the LoRA patches (:data:`TE_LAYERS`) are written: ComfyUI loads a
  partial text encoder (it logs the missing keys) and builds the rest unfilled, and the full
  CLIP-G alone would be 695 M parameters (1.4 GB in fp16) per file.
* **SSD-1B-like target** (detected as ``SSD1B``, depths ``[0, 0, 2, 2, 4, 4]``): the SDXL
  source's levels-3 blocks ``input_blocks.{7,8}.1`` keep transformer blocks :data:`SSD_KEEP`
  of 10, renumbered 0..3 as SSD-1B does, each fine-tuned; everything else is the fine-tune.
  A diffusion-model file (the SDXL source checkpoint is the source).
* **SD2.x checkpoint** (detected as ``SD20``): one 320-wide level like the SD1.5 tiny UNet but
  with context 1024 and linear ``proj_in``; OpenCLIP-H text encoder blocks :data:`TE_LAYERS` in
  ``cond_stage_model.model.…`` (fused ``in_proj``).
* LoRAs (kohya): ``sdxl`` – ``input_blocks.4.1`` attention/ff/proj layers plus ``lora_te1_``
  and ``lora_te2_`` on :data:`TE_LAYERS`; ``sdxl_deep`` – every attention/ff layer of the ten
  blocks of ``input_blocks.7.1`` (for the SSD-1B pairing); ``sd2`` – all UNet attention/ff/proj
  layers plus ``lora_te_`` on :data:`TE_LAYERS`.

Usage::

    python scripts/tiny_unet_families.py [--out DIR]   # default: out/.cache/tiny-unet-families-v1
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.make_tiny_models import (  # after the sys.path line: run as a script, the repo root is not on it
    LORA_ALPHA,
    LORA_RANK,
    _fill,
    _finetune,
    _half,
    _import_comfy,
    _kohya_layer,
    run_maker,
)

ROOT = Path(__file__).resolve().parent.parent
GENERATOR_VERSION = "1"
DEFAULT_OUT = ROOT / "out" / ".cache" / f"tiny-unet-families-v{GENERATOR_VERSION}"
# Text-encoder blocks written to the checkpoints and patched by the LoRAs.
TE_LAYERS = (0,)
# SSD-1B-like target: which of the SDXL source's 10 transformer blocks of input_blocks.{7,8}.1 it keeps.
SSD_KEEP = (0, 3, 6, 9)
SSD_BLOCKS = ("input_blocks.7.1", "input_blocks.8.1")
# The layers a kohya LoRA trains in a transformer block, and the text-encoder modules.
UNET_PARTS = (".attn1.to_", ".attn2.to_", ".ff.net.0.proj.", ".ff.net.2.", ".proj_in.", ".proj_out.")
TE_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


@dataclass(frozen=True)
class UnetFamilies:
    """Paths of one generated set, laid out like ComfyUI's ``models`` folder."""

    root: Path
    sdxl_source: Path
    sdxl_target: Path
    ssd_target: Path
    sd2_source: Path
    sd2_target: Path
    sdxl_lora: Path
    sdxl_deep_lora: Path
    sd2_lora: Path


def paths(root: Path) -> UnetFamilies:
    """Where a generated set lives under ``root`` (files may not exist yet)."""
    return UnetFamilies(
        root=root,
        sdxl_source=root / "checkpoints" / "lorax_tiny_sdxl_source.safetensors",
        sdxl_target=root / "checkpoints" / "lorax_tiny_sdxl_target.safetensors",
        ssd_target=root / "diffusion_models" / "lorax_tiny_ssd1b_target_unet.safetensors",
        sd2_source=root / "checkpoints" / "lorax_tiny_sd2_source.safetensors",
        sd2_target=root / "checkpoints" / "lorax_tiny_sd2_target.safetensors",
        sdxl_lora=root / "loras" / "lorax_tiny_sdxl_lora.safetensors",
        sdxl_deep_lora=root / "loras" / "lorax_tiny_sdxl_deep_lora.safetensors",
        sd2_lora=root / "loras" / "lorax_tiny_sd2_lora.safetensors",
    )


def _sdxl_unet(depth: list[int]) -> dict[str, torch.Tensor]:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(
            image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[2, 2, 2],
            channel_mult=[1, 1, 1], num_heads=-1, num_head_channels=64, use_spatial_transformer=True,
            transformer_depth=depth, transformer_depth_output=[0] * 9,
            transformer_depth_middle=1, context_dim=2048, use_linear_in_transformer=True, legacy=False,
            adm_in_channels=2816, num_classes="sequential", dtype=torch.float16,
        )  # fmt: skip
    return unet.state_dict()


def _sd2_unet() -> dict[str, torch.Tensor]:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(
            image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
            channel_mult=[1], num_heads=-1, num_head_channels=64, use_spatial_transformer=True, transformer_depth=[1],
            transformer_depth_output=[1, 1], transformer_depth_middle=1, context_dim=1024,
            use_linear_in_transformer=True, legacy=False, dtype=torch.float16,
        )  # fmt: skip
    return unet.state_dict()


def _te_blocks(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the encoder blocks in :data:`TE_LAYERS` (see the module docstring)."""
    wanted = tuple(f".encoder.layers.{i}." for i in TE_LAYERS)
    return {k: v for k, v in sd.items() if any(w in k for w in wanted)}


def _clip_meta(kind: str) -> dict[str, torch.Tensor]:
    """HF-named meta state dict of ComfyUI's SDXL (``clip_l.*``, ``clip_g.*``) or SD2 (``clip_h.*``) text encoder."""
    if kind == "sdxl":
        import comfy.sdxl_clip

        model = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16)
    else:
        import comfy.text_encoders.sd2_clip

        model = comfy.text_encoders.sd2_clip.SD2ClipModel(device="meta", dtype=torch.float16)
    return _te_blocks(model.state_dict())


def _checkpoint(
    config: object, unet: dict[str, torch.Tensor], clip: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A checkpoint in the family's own layout: ComfyUI's ``process_clip_state_dict_for_saving`` names the text encoders."""
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    te = config.process_clip_state_dict_for_saving(dict(clip))  # type: ignore[attr-defined]
    sd.update({k: v for k, v in te.items() if "position_ids" not in k})
    return _half(sd)


def _ssd_target(
    source: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], meta: dict[str, torch.Tensor], gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """The fine-tune with :data:`SSD_KEEP` of each :data:`SSD_BLOCKS` block's transformer blocks, renumbered."""
    out = {k: tuned[k] for k in meta if k in tuned and not any(f"{b}.transformer_blocks." in k for b in SSD_BLOCKS)}
    for block in SSD_BLOCKS:
        for j, i in enumerate(SSD_KEEP):
            head = f"{block}.transformer_blocks.{i}."
            kept = {
                k.replace(head, f"{block}.transformer_blocks.{j}."): v for k, v in source.items() if k.startswith(head)
            }
            out.update(_finetune(kept, gen))
    missing = set(meta) - set(out)
    if missing:
        raise RuntimeError(f"SSD-1B-like target lacks {sorted(missing)[:3]}")
    return out


def _unet_lora(unet: dict[str, torch.Tensor], scope: tuple[str, ...], gen: torch.Generator) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for key, w in unet.items():
        if key.endswith(".weight") and w.ndim >= 2 and key.startswith(scope) and any(p in key for p in UNET_PARTS):
            shape = tuple(w.shape)
            name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
            sd.update(_kohya_layer(name, shape[0], shape[1:] if len(shape) == 4 else (shape[1],), gen))
    return sd


def _te_lora(clip: dict[str, torch.Tensor], encoder: str, prefix: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for i in TE_LAYERS:
        for part in TE_PARTS:
            w = clip[f"{encoder}.transformer.text_model.encoder.layers.{i}.{part}.weight"]
            sd.update(_kohya_layer(f"{prefix}text_model_encoder_layers_{i}_{part.replace('.', '_')}", w.shape[0],
                                   (w.shape[1],), gen))  # fmt: skip
    return sd


def make_unet_families(root: Path = DEFAULT_OUT, seed: int = 0) -> UnetFamilies:
    """Write the set under ``root`` (idempotent: a finished set is reused as is)."""
    models = paths(root)
    stamp = root / "done.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("seed") == seed:
        return models
    _import_comfy()
    import comfy.supported_models as sm

    gen = torch.Generator().manual_seed(seed)
    meta = {"generator": f"lorax tiny_unet_families v{GENERATOR_VERSION}", "seed": str(seed)}
    for folder in ("checkpoints", "diffusion_models", "loras"):
        (root / folder).mkdir(parents=True, exist_ok=True)

    sdxl_meta = _sdxl_unet([0, 0, 2, 2, 10, 10])
    sdxl = _fill(sdxl_meta, gen)
    sdxl_clip = _fill(_clip_meta("sdxl"), gen)
    sdxl_tuned = _finetune(sdxl, gen)
    sdxl_config = sm.SDXL(sm.SDXL.unet_config)
    save_file(_checkpoint(sdxl_config, sdxl, sdxl_clip), str(models.sdxl_source), metadata=meta)
    save_file(_checkpoint(sdxl_config, sdxl_tuned, _finetune(sdxl_clip, gen)), str(models.sdxl_target), metadata=meta)
    ssd = _ssd_target(sdxl, sdxl_tuned, _sdxl_unet([0, 0, 2, 2, 4, 4]), gen)
    save_file(_half(ssd), str(models.ssd_target), metadata=meta)
    xl_meta = meta | {"ss_network_dim": str(LORA_RANK), "ss_network_alpha": str(LORA_ALPHA),
                      "ss_base_model_version": "sdxl_base_v1-0"}  # fmt: skip
    lora = _unet_lora(sdxl, ("input_blocks.4.1.",), gen)
    lora |= _te_lora(sdxl_clip, "clip_l", "lora_te1_", gen) | _te_lora(sdxl_clip, "clip_g", "lora_te2_", gen)
    save_file(lora, str(models.sdxl_lora), metadata=xl_meta)
    deep = _unet_lora(sdxl, ("input_blocks.7.1.transformer_blocks.",), gen)
    save_file(deep, str(models.sdxl_deep_lora), metadata=xl_meta)

    sd2 = _fill(_sd2_unet(), gen)
    sd2_clip = _fill(_clip_meta("sd2"), gen)
    sd2_config = sm.SD20(sm.SD20.unet_config)
    save_file(_checkpoint(sd2_config, sd2, sd2_clip), str(models.sd2_source), metadata=meta)
    save_file(_checkpoint(sd2_config, _finetune(sd2, gen), _finetune(sd2_clip, gen)), str(models.sd2_target),
              metadata=meta)  # fmt: skip
    sd2_lora = _unet_lora(sd2, ("",), gen) | _te_lora(sd2_clip, "clip_h", "lora_te_", gen)
    save_file(sd2_lora, str(models.sd2_lora), metadata=meta | {"ss_base_model_version": "sd_v2"})
    stamp.write_text(json.dumps({"seed": seed, "version": GENERATOR_VERSION}))
    return models


def main(argv: list[str] | None = None) -> int:
    return run_maker(make_unet_families, "tiny UNet families", __doc__.split("\n\n")[0], DEFAULT_OUT, argv)


if __name__ == "__main__":
    sys.exit(main())
