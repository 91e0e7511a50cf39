"""LoRA files written by the real ecosystem tools, and loaders that read them back the way those tools do.

Test-only (needs ``diffusers``, ``peft`` and ``transformers`` from requirements-dev.txt). The
files are made by the libraries' own code, never spelled by hand:

* PEFT adapters (``peft.LoraConfig`` + ``inject_adapter_in_model``/``get_peft_model``) on a diffusers
  ``UNet2DConditionModel`` and a transformers-5 ``CLIPTextModel`` (whose module names have no
  ``text_model.``), saved by diffusers' ``StableDiffusionPipeline.save_lora_weights`` (with and
  without ``lora_adapter_metadata``), by ``UNet2DConditionModel.save_lora_adapter`` (unprefixed
  keys), and as a ``PeftModel.state_dict()`` (``base_model.model.…lora_A.default.weight``);
* the same adapter converted by diffusers' ``convert_state_dict_to_kohya``;
* a diffusers-layout UNet (``diffusion_pytorch_model.safetensors``) that ComfyUI detects as SD15.

The diffusers UNets mirror the pack's tiny SD1.5 set (scripts/make_tiny_models.py: one level,
320 channels, context 768, linear-free transformer): their diffusers module names are exactly
what ComfyUI's SD15 key tables produce for that UNet, and their shapes fit it. The text encoder
has CLIP-L's widths and two of its twelve layers. Everything is seeded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "out" / ".cache" / "ecosystem-v2"

# The tiny SD1.5 UNet of scripts/make_tiny_models.py, in diffusers' terms.
LDM_UNET: dict[str, Any] = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (320,),
    "down_block_types": ("CrossAttnDownBlock2D",), "up_block_types": ("CrossAttnUpBlock2D",),
    "layers_per_block": 1, "cross_attention_dim": 768, "attention_head_dim": 8,
}  # fmt: skip
# A diffusers UNet ComfyUI's model_config_from_diffusers_unet detects as SD15 (it matches
# transformer depths, model/context channels; the deeper levels are kept narrow to stay small).
SD15_DIFFUSERS_UNET: dict[str, Any] = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (320, 32, 32, 32),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "layers_per_block": 2, "cross_attention_dim": 768, "attention_head_dim": 8,
}  # fmt: skip
TE_LAYERS = 2
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
RANK = 4
UNET_ALPHA = 2.0  # diffusers scale lora_alpha / r = 0.5
TE_ALPHA = 8.0  # scale 2


@contextmanager
def _quiet() -> Iterator[None]:
    """diffusers/transformers log config notes on every model built; keep the test output readable."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def diffusers_unet(config: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """A seeded diffusers ``UNet2DConditionModel`` (float32, CPU)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with _quiet():
        return UNet2DConditionModel(**config)


def clip_text_model(seed: int = 0) -> torch.nn.Module:
    """A transformers ``CLIPTextModel`` with CLIP-L's widths and :data:`TE_LAYERS` layers (tiny vocabulary)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=1000, hidden_size=768, intermediate_size=3072, num_hidden_layers=TE_LAYERS,
        num_attention_heads=12, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    with _quiet():
        return CLIPTextModel(config)


def lora_config(targets: list[str], alpha: float) -> Any:
    """A PEFT ``LoraConfig`` with random (non-zero) ``lora_B``, so every layer changes something."""
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)


def _with_adapter(model: torch.nn.Module, config: Any, seed: int) -> torch.nn.Module:
    from peft import inject_adapter_in_model

    torch.manual_seed(seed)
    model = inject_adapter_in_model(config, model)
    # PEFT's random init of lora_B is kaiming-sized; scale it to a trained LoRA's ‖ΔW‖ ≪ ‖W‖.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.05)
    return model


def _adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def write_ecosystem_files(root: Path = CACHE) -> dict[str, Path]:
    """Write (once; a stamp makes later calls free) every real-tool file the ecosystem tests use.

    Returns ``{name: path}``: LoRAs ``pipeline_meta``, ``pipeline_nometa``, ``kohya``,
    ``model_level``, ``peft_model`` (for the tiny LDM checkpoint) and ``diffusers_unet_lora``;
    models ``diffusers_source`` and ``diffusers_target`` (diffusers-layout SD15 UNets).
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import get_peft_model

    paths = {
        "pipeline_meta": root / "pipeline_meta" / "pytorch_lora_weights.safetensors",
        "pipeline_nometa": root / "pipeline_nometa" / "pytorch_lora_weights.safetensors",
        "kohya": root / "kohya_from_diffusers.safetensors",
        "model_level": root / "model_level" / "pytorch_lora_weights.safetensors",
        "peft_model": root / "peft_model_state_dict.safetensors",
        "diffusers_unet_lora": root / "diffusers_unet_lora" / "pytorch_lora_weights.safetensors",
        "diffusers_source": root / "diffusers_source" / "diffusion_pytorch_model.safetensors",
        "diffusers_target": root / "diffusers_target" / "diffusion_pytorch_model.safetensors",
    }
    stamp = root / "done.json"
    if stamp.is_file() and all(p.is_file() for p in paths.values()):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    unet_cfg, te_cfg = lora_config(UNET_TARGETS, UNET_ALPHA), lora_config(TE_TARGETS, TE_ALPHA)
    unet = _with_adapter(diffusers_unet(LDM_UNET), unet_cfg, seed=1)
    te = _with_adapter(clip_text_model(), te_cfg, seed=2)
    unet_sd, te_sd = _adapter_state(unet), _adapter_state(te)
    with _quiet():
        for name, meta in (("pipeline_meta", True), ("pipeline_nometa", False)):
            extra = {
                "unet_lora_adapter_metadata": unet_cfg.to_dict(),
                "text_encoder_lora_adapter_metadata": te_cfg.to_dict(),
            }
            StableDiffusionPipeline.save_lora_weights(
                paths[name].parent, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd, **(extra if meta else {})
            )
        unet.save_lora_adapter(paths["model_level"].parent)
    # diffusers' documented path to a kohya/A1111 file: the pipeline's (prefixed) PEFT dict, converted.
    prefixed = {f"unet.{k}": v for k, v in unet_sd.items()} | {f"text_encoder.{k}": v for k, v in te_sd.items()}
    kohya = convert_state_dict_to_kohya(prefixed)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(paths["kohya"]))
    # A PeftModel's own state dict: base_model.model.<path>.lora_A.default.weight.
    torch.manual_seed(3)
    peft_unet = get_peft_model(diffusers_unet(LDM_UNET), lora_config(UNET_TARGETS, UNET_ALPHA))
    peft_sd = {k: v.detach().clone().contiguous() for k, v in peft_unet.state_dict().items() if ".lora_" in k}
    save_file(peft_sd, str(paths["peft_model"]))
    # The diffusers-layout models: source, and a fine-tune-like target (small update on every matrix).
    source = diffusers_unet(SD15_DIFFUSERS_UNET, seed=4).to(torch.float16)
    with _quiet():
        source.save_pretrained(paths["diffusers_source"].parent)
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for param in source.parameters():
                if param.ndim >= 2:
                    noise = torch.randn(param.shape, generator=gen) / param.numel() ** 0.5
                    param.add_((0.02 * param.float().norm() * noise).to(param.dtype))
        source.save_pretrained(paths["diffusers_target"].parent)
        lora_unet = _with_adapter(diffusers_unet(SD15_DIFFUSERS_UNET, seed=4), unet_cfg, seed=6)
        StableDiffusionPipeline.save_lora_weights(
            paths["diffusers_unet_lora"].parent,
            unet_lora_layers=_adapter_state(lora_unet),
            unet_lora_adapter_metadata=unet_cfg.to_dict(),
        )
    stamp.write_text(json.dumps({"version": 1}))
    return paths


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata, as every loader sees them."""
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})


def _delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * (b.detach().reshape(b.shape[0], -1).double() @ a.detach().reshape(a.shape[0], -1).double())


def diffusers_deltas(path: Path, unet_config: dict[str, Any], *, text_encoder: bool) -> dict[str, torch.Tensor]:
    """Load a LoRA file as diffusers does and return ``{module: ΔW}`` (float64, ``scaling · B @ A``).

    Pipeline files (``unet.``/``text_encoder.`` keys, or kohya names) go through
    ``StableDiffusionPipeline.lora_state_dict`` + ``load_lora_into_unet``/``load_lora_into_text_encoder``
    (what ``pipe.load_lora_weights`` runs, ``lora_adapter_metadata`` included); an unprefixed file
    through ``UNet2DConditionModel.load_lora_adapter``. Modules are named ``unet.<path>`` /
    ``text_encoder.<path>``. diffusers raises on a size mismatch between the metadata and the tensors.
    """
    from diffusers import StableDiffusionPipeline

    unet = diffusers_unet(unet_config)
    te = clip_text_model() if text_encoder else None
    keys, _ = read_file(path)
    with _quiet():
        if any(k.startswith(("unet.", "text_encoder.", "lora_unet_", "lora_te_")) for k in keys):
            state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
                str(path.parent), weight_name=path.name, return_lora_metadata=True
            )
            StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, adapter_name="t", metadata=metadata)
            if te is not None:
                StableDiffusionPipeline.load_lora_into_text_encoder(
                    state, alphas, te, prefix="text_encoder", adapter_name="t", metadata=metadata
                )
        else:
            unet.load_lora_adapter(str(path.parent), weight_name=path.name, prefix=None, adapter_name="t")
    out: dict[str, torch.Tensor] = {}
    for part, model in (("unet", unet), ("text_encoder", te)):
        if model is None:
            continue
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "t" in getattr(module, "lora_A", {}):
                out[f"{part}.{name}"] = _delta(
                    module.lora_A["t"].weight, module.lora_B["t"].weight, module.scaling["t"]
                )
    return out


def comfy_patches(path: Path, key_map: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Load a LoRA file as ComfyUI's ``LoraLoader`` does (``convert_lora`` + ``comfy.lora.load_lora``).

    Args:
        key_map: ComfyUI's key map (e.g. from ``lorax_core.cli._comfyui_key_map``).

    Returns:
        ``{model key: ΔW}`` (float64, ComfyUI's ``alpha / rank`` or 1) for each layer ComfyUI loads.
    """
    import comfy.lora  # noqa: TID251 -- the test drives the real host
    import comfy.lora_convert  # noqa: TID251

    tensors, _ = read_file(path)
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(tensors), key_map, log_missing=False)
    out: dict[str, torch.Tensor] = {}
    for key, patch in patches.items():
        up, down, alpha = patch.weights[0], patch.weights[1], patch.weights[2]
        scale = 1.0 if alpha is None else alpha / down.shape[0]
        out[key if isinstance(key, str) else key[0]] = _delta(down, up, scale)
    return out


def peft_model_deltas(path: Path, unet_config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Load a ``PeftModel.state_dict()``-style file back with PEFT's own ``load_state_dict``.

    The file carries no config (PEFT keeps it in ``adapter_config.json``); the adapter is built
    with the file's rank and ``lora_alpha = r`` (scale 1, what the pack writes for such files).

    Returns:
        ``({module: ΔW}, missing LoRA keys)``.
    """
    from peft import LoraConfig, get_peft_model

    tensors, _ = read_file(path)
    ranks = {int(t.shape[0]) for k, t in tensors.items() if ".lora_A." in k}
    (rank,) = ranks
    targets = sorted({k.split(".lora_A.")[0].removeprefix("base_model.model.") for k in tensors if ".lora_A." in k})
    model = get_peft_model(diffusers_unet(unet_config), LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    result = model.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    out = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            out[f"unet.{name}"] = _delta(
                module.lora_A["default"].weight, module.lora_B["default"].weight, module.scaling["default"]
            )
    return out, missing
