"""Tiny synthetic DiT models that ComfyUI v0.3.75 detects as Flux.1, SD3.5 and Wan 2.1, with LoRAs.

The companion of ``make_tiny_models.py`` (SD1.5, an SDXL derivative) for the transformer
families whose attention projections are *fused* (Flux ``qkv``/``linear1``, SD3 ``qkv``) or
that ComfyUI maps only through its generic key table (Wan). Per family:

* the diffusion model, built with ComfyUI's own model classes on the ``meta`` device from the
  config its detection returns (``comfy.model_detection.model_config_from_unet_config`` →
  ``get_model``), so names and shapes are exactly ComfyUI's; the builder checks that ComfyUI
  detects the written file as the intended family;
* a "fine-tune" target (source + a small low-rank update + noise, as in ``make_tiny_models``);
* LoRAs in the family's common formats, their layer names taken from ComfyUI's own LoRA key map
  (``comfy.lora.model_lora_keys_unet``) for the built model, so a name ComfyUI maps to a slice
  of a fused weight gets factors of that slice's shape.

============  ===========================================  ==============================================
family        model (diffusion model only, fp16)            LoRAs
============  ===========================================  ==============================================
Flux.1        schnell layout, 1 double + 1 single block;   diffusers/PEFT (``transformer.…to_q``, 10 fused
              width 3072 is fixed by detection (24 heads    slices + 5 whole layers), kohya-Flux
              × 128-wide rotary axes); ≈ 0.5 B params       (``lora_unet_double_blocks_0_img_attn_qkv``, 6)
SD3.5         MMDiT, depth 3 (width 192, "Large"-like);     diffusers/PEFT (``transformer.transformer_blocks
              depth 2 (width 128, "Medium"-like, with       .N.attn.to_q``…), every attention and MLP layer
              ``attn2``), both with RMS q/k norms
Wan 2.1       t2v, width 128, 2 blocks                      diffusers/PEFT (``diffusion_model.blocks.N
                                                            .self_attn.q``…), generic key map
============  ===========================================  ==============================================

Sizes on disk: Flux ≈ 1 GB per file (source, target); the others under 10 MB. Each family has
its own stamp, so a test that needs only SD3 never builds Flux.

Usage::

    python scripts/tiny_dit_families.py [--out DIR] [--family flux|sd35|sd35_medium|wan ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.make_tiny_models import _decaying, _fill, _finetune, _half, _import_comfy

ROOT = Path(__file__).resolve().parent.parent
GENERATOR_VERSION = "1"
DEFAULT_OUT = ROOT / "out" / ".cache" / f"tiny-dit-v{GENERATOR_VERSION}"
LORA_RANK = 4

# ComfyUI's detected configs (comfy.model_detection.detect_unet_config, v0.3.75) with the sizes
# made small wherever detection reads them from shapes; fixed values are detection's own.
_FLUX = {
    "image_model": "flux", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0, "theta": 10000,
    "out_channels": 16, "qkv_bias": True, "in_channels": 16, "hidden_size": 3072, "context_in_dim": 64,
    "patch_size": 2, "vec_in_dim": 32, "depth": 1, "depth_single_blocks": 1, "guidance_embed": False,
}  # fmt: skip


def _mmdit(depth: int, self_attn_layers: list[int]) -> dict[str, Any]:
    width = 64 * depth  # detection: depth = x_embedder width // 64, heads = depth
    return {
        "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": depth, "input_size": None,
        "adm_in_channels": 64, "num_patches": 64, "pos_embed_max_size": 8, "qk_norm": "rms",
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": width}},
        "pos_embed_scaling_factor": None, "x_block_self_attn_layers": self_attn_layers,
    }  # fmt: skip


_WAN = {
    "image_model": "wan2.1", "dim": 128, "out_dim": 16, "num_heads": 1, "ffn_dim": 256, "num_layers": 2,
    "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True,
    "eps": 1e-6, "in_dim": 16, "model_type": "t2v",
}  # fmt: skip

#: family → (unet config, ComfyUI config class name it must be detected as)
FAMILIES: dict[str, tuple[dict[str, Any], str]] = {
    "flux": (_FLUX, "FluxSchnell"),
    "sd35": (_mmdit(3, []), "SD3"),
    "sd35_medium": (_mmdit(2, [0, 1]), "SD3"),
    "wan": (_WAN, "WAN21_T2V"),
}

# Diffusers names of the layers a typical Flux LoRA trains (ai-toolkit / diffusers' train_dreambooth_lora_flux).
_FLUX_PEFT = (
    "transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_k",
    "transformer.transformer_blocks.0.attn.to_v", "transformer.transformer_blocks.0.attn.add_q_proj",
    "transformer.transformer_blocks.0.attn.add_k_proj", "transformer.transformer_blocks.0.attn.add_v_proj",
    "transformer.transformer_blocks.0.attn.to_out.0", "transformer.transformer_blocks.0.attn.to_add_out",
    "transformer.transformer_blocks.0.ff.net.0.proj", "transformer.transformer_blocks.0.ff.net.2",
    "transformer.single_transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.attn.to_k",
    "transformer.single_transformer_blocks.0.attn.to_v", "transformer.single_transformer_blocks.0.proj_mlp",
    "transformer.single_transformer_blocks.0.proj_out",
)  # fmt: skip
# kohya sd-scripts' Flux LoRA (networks/lora_flux.py) names BFL modules, fused weights whole.
_FLUX_KOHYA = (
    "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_attn_proj",
    "lora_unet_double_blocks_0_txt_attn_qkv", "lora_unet_double_blocks_0_txt_attn_proj",
    "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2",
)  # fmt: skip
_SD3_PARTS = (".attn.to_q", ".attn.to_k", ".attn.to_v", ".attn.add_q_proj", ".attn.add_k_proj", ".attn.add_v_proj",
              ".attn.to_out.0", ".attn.to_add_out", ".attn2.to_q", ".attn2.to_k", ".attn2.to_v", ".attn2.to_out.0",
              ".ff.net.0.proj", ".ff.net.2", ".ff_context.net.0.proj", ".ff_context.net.2")  # fmt: skip
_WAN_PARTS = (".self_attn.q", ".self_attn.k", ".self_attn.v", ".self_attn.o",
              ".cross_attn.q", ".cross_attn.k", ".cross_attn.v", ".cross_attn.o", ".ffn.0", ".ffn.2")  # fmt: skip


@dataclass(frozen=True)
class TinyDit:
    """Paths of one family's set; ``root`` is laid out like ComfyUI's ``models`` folder.

    Attributes:
        family: a key of :data:`FAMILIES`.
        source, target: diffusion-model files (``diffusion_models/``).
        loras: ``{format: LoRA file}`` (``loras/``): ``peft`` for every family, ``kohya`` for Flux.
    """

    family: str
    root: Path
    source: Path
    target: Path
    loras: dict[str, Path]


def paths(family: str, root: Path = DEFAULT_OUT) -> TinyDit:
    """Where a family's set lives under ``root`` (files may not exist yet)."""
    formats = ("peft", "kohya") if family == "flux" else ("peft",)
    return TinyDit(
        family=family,
        root=root,
        source=root / "diffusion_models" / f"lorax_tiny_{family}_source.safetensors",
        target=root / "diffusion_models" / f"lorax_tiny_{family}_target.safetensors",
        loras={f: root / "loras" / f"lorax_tiny_{family}_{f}_lora.safetensors" for f in formats},
    )


def _build(family: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(meta state dict of the diffusion model, ComfyUI's LoRA key map for it)``, from ComfyUI's classes."""
    _import_comfy()
    import comfy.lora
    import comfy.model_detection

    unet_config, expected = FAMILIES[family]
    config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    if config is None or type(config).__name__ != expected:
        raise SystemExit(f"{family}: ComfyUI picked {type(config).__name__} for the config, expected {expected}")
    config.set_inference_dtype(torch.float32, None)
    with torch.device("meta"):
        model = config.get_model({}, "", device="meta")
    state = {k[len("diffusion_model.") :]: v for k, v in model.state_dict().items() if k.startswith("diffusion_model.")}
    detected = comfy.model_detection.model_config_from_unet(dict(state), "")
    if detected is None or type(detected).__name__ != expected:
        raise SystemExit(f"{family}: the built model is detected as {type(detected).__name__}, expected {expected}")
    return state, comfy.lora.model_lora_keys_unet(model, {})


def _lora_names(family: str, key_map: dict[str, Any], state: dict[str, torch.Tensor]) -> list[str]:
    """The PEFT LoRA's layer names: key-map names of the family's attention/MLP layers this model has."""
    if family == "flux":
        return list(_FLUX_PEFT)
    if family.startswith("sd35"):
        prefix, parts = "transformer.transformer_blocks.", _SD3_PARTS
    else:
        prefix, parts = "diffusion_model.blocks.", _WAN_PARTS

    def present(target: Any) -> bool:  # the key map also names layers of bigger variants (attn2)
        key = target if isinstance(target, str) else target[0]
        return key[len("diffusion_model.") :] in state

    return sorted(n for n, t in key_map.items() if n.startswith(prefix) and n.endswith(parts) and present(t))


def _target_shape(target: Any, state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(out, in)`` of the matrix a key-map target names: a whole weight, or rows of a fused one."""
    key, piece = (target, None) if isinstance(target, str) else target
    shape = state[key[len("diffusion_model.") :]].shape
    return (piece[2] if piece is not None else int(shape[0])), int(shape[1])


def _lora(
    names: list[str], key_map: dict[str, Any], state: dict[str, torch.Tensor], style: str, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """Random rank-``LORA_RANK`` factors per name: PEFT ``lora_A``/``lora_B``, or kohya with ``alpha``."""
    sd: dict[str, torch.Tensor] = {}
    for name in names:
        out_dim, in_dim = _target_shape(key_map[name], state)
        down = torch.randn(LORA_RANK, in_dim, generator=gen) / in_dim**0.5
        up = 0.05 * torch.randn(out_dim, LORA_RANK, generator=gen)
        if style == "peft":
            sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = down, up
        else:
            sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
            sd[f"{name}.alpha"] = torch.tensor(float(LORA_RANK))
    return _half(sd)


def _fill_dit(meta: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``make_tiny_models._fill``, with a cheaper spectrum for the 0.5 B-parameter Flux matrices."""
    if sum(t.numel() for t in meta.values()) < 50_000_000:
        return _fill(meta, gen)
    out = _fill({k: v for k, v in meta.items() if v.ndim < 2}, gen)
    for key, t in meta.items():
        if t.ndim >= 2:
            out[key] = _decaying(tuple(t.shape), gen, max_rank=64)
    return out


def make_family(family: str, root: Path = DEFAULT_OUT, seed: int = 0) -> TinyDit:
    """Write one family's set under ``root`` (idempotent: a finished set is reused as is)."""
    if family not in FAMILIES:
        raise SystemExit(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    out = paths(family, root)
    stamp = root / f"done-{family}.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("seed") == seed:
        return out
    gen = torch.Generator().manual_seed(seed)
    meta_state, key_map = _build(family)
    source = _fill_dit(meta_state, gen)
    meta = {"generator": f"lorax tiny_dit_families v{GENERATOR_VERSION}", "seed": str(seed), "family": family}
    for path in (out.source, *out.loras.values()):
        path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_half(source), str(out.source), metadata=meta)
    save_file(_half(_finetune(source, gen)), str(out.target), metadata=meta)
    names = {"peft": _lora_names(family, key_map, source), "kohya": list(_FLUX_KOHYA)}
    for style, path in out.loras.items():
        save_file(_lora(names[style], key_map, source, style, gen), str(path), metadata=meta)
    stamp.write_text(json.dumps({"seed": seed, "version": GENERATOR_VERSION}))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--family", action="append", choices=list(FAMILIES), help="families to build (default all)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    for family in args.family or list(FAMILIES):
        made = make_family(family, args.out.resolve(), args.seed)
        print(f"{family}: {made.source.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
