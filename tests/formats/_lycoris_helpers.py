"""LyCORIS adapters made by the real ``lycoris-lora`` package on layers of the tiny SD1.5 checkpoint.

Test-only (``lycoris-lora`` from requirements-dev.txt). A module tree with the checkpoint's own
paths and weights (``input_blocks.1.1.proj_in`` …) is wrapped by ``LycorisNetwork`` with the
kohya prefix ``lora_unet``, so the file's layer names are the ones ComfyUI's key map knows. The
adapter's parameters are then set to seeded random values (a fresh adapter is zero on one side)
and saved with ``LycorisNetwork.save_weights``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

#: Layers of the tiny SD1.5 UNet wrapped by every adapter: linear (square, wide, tall), 1×1 and 3×3 conv.
LAYERS = (
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj",
    "input_blocks.1.1.proj_in",
    "input_blocks.1.0.in_layers.2",
)

#: name → LycorisNetwork keyword arguments.
KINDS: dict[str, dict[str, Any]] = {
    "loha": {"network_module": "loha"},
    "loha_tucker": {"network_module": "loha", "use_tucker": True},
    "lokr_factored": {"network_module": "lokr", "decompose_both": True, "factor": 8},
    "lokr_full": {"network_module": "lokr", "full_matrix": True, "factor": 8},
    "lokr_tucker": {"network_module": "lokr", "use_tucker": True, "factor": 8},
    "locon_tucker": {"network_module": "locon", "use_tucker": True},
    "dora": {"network_module": "locon", "weight_decompose": True},
    "loha_dora": {"network_module": "loha", "weight_decompose": True},
    "full": {"network_module": "full"},
}


def _module_tree(checkpoint: Path) -> torch.nn.Module:
    """Linear/Conv2d modules at :data:`LAYERS`' paths with the checkpoint's weights and biases."""
    root = torch.nn.Module()
    with safe_open(str(checkpoint), "pt") as f:
        for path in LAYERS:
            weight = f.get_tensor(f"model.diffusion_model.{path}.weight").to(torch.float32)
            bias = f"model.diffusion_model.{path}.bias" in f.keys()
            if weight.ndim == 2:
                module: torch.nn.Module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
            else:
                k = weight.shape[2]
                module = torch.nn.Conv2d(weight.shape[1], weight.shape[0], k, padding=k // 2, bias=bias)
            module.weight.data.copy_(weight)
            if bias:
                module.bias.data.copy_(f.get_tensor(f"model.diffusion_model.{path}.bias"))
            parent = root
            *heads, leaf = path.split(".")
            for head in heads:
                if not hasattr(parent, head):
                    parent.add_module(head, torch.nn.Module())
                parent = getattr(parent, head)
            parent.add_module(leaf, module)
    return root


def make_lycoris_file(kind: str, checkpoint: Path, out: Path, seed: int = 0) -> Path:
    """Write one adapter of ``kind`` (:data:`KINDS`) with lycoris-lora; returns ``out``."""
    from lycoris.wrapper import LycorisNetwork

    saved = (LycorisNetwork.TARGET_REPLACE_MODULE, LycorisNetwork.TARGET_REPLACE_NAME, LycorisNetwork.LORA_PREFIX)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        LycorisNetwork.apply_preset(
            {"target_module": ["Linear", "Conv2d"], "target_name": [], "lora_prefix": "lora_unet"}
        )
        torch.manual_seed(seed)
        model = _module_tree(checkpoint)
        net = LycorisNetwork(model, multiplier=1.0, lora_dim=4, conv_lora_dim=4, alpha=2, conv_alpha=2, **KINDS[kind])
        net.apply_to()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in net.named_parameters():
                noise = torch.randn(p.shape, generator=gen)
                if name.endswith("dora_scale"):
                    p.mul_(1 + 0.1 * noise)  # a trained magnitude: near ‖W₀‖, not equal to it
                elif name.endswith(("diff", "diff_b")):
                    p.copy_(0.01 * noise)
                else:
                    p.copy_(0.2 * noise)
        net.save_weights(str(out), torch.float32, {"ss_network_module": f"lycoris.kohya ({kind})"})
    finally:
        LycorisNetwork.apply_preset({"target_module": saved[0], "target_name": saved[1], "lora_prefix": saved[2]})
        logging.disable(previous)
    return out
