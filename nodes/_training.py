"""ComfyUI training glue shared by Refine Transferred LoRA (``_refine_host``) and Train LoRA-X (``_train_host``).

Both train weight adapters on a clone of a ComfyUI ``MODEL`` with ComfyUI's own machinery
(reused, not rewritten): the latent check of its samplers (``fix_empty_latent_channels``),
weight wrappers that hand autograd a copy of inference-mode weights, and the gradient
checkpointing of ``comfy_extras.nodes_train`` (``patch``/``unpatch``), undone on the way out
because a clone shares its modules with the model it came from.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import comfy.model_management
import comfy.sample
import torch
from comfy_extras.nodes_train import find_all_highest_child_module_with_forward, patch, unpatch

from ..lorax_core.errors import OptionError
from . import _host

Conditioning = list[list[Any]]  # ComfyUI's CONDITIONING: [[cross-attention tensor, {extras}], ...]


def fit_latent(model: Any, samples: torch.Tensor, name: str, fix: str) -> torch.Tensor:
    """``samples`` with the model's latent channels (``fix_empty_latent_channels``), shape-checked.

    Raises:
        OptionError: not the model's channel count or dimensionality; the message names the
            input (``name``) and ends with the node's own ``fix``.
    """
    samples = comfy.sample.fix_empty_latent_channels(model, samples)
    fmt = model.get_model_object("latent_format")
    want = (fmt.latent_channels, 2 + fmt.latent_dimensions)
    if (samples.shape[1], samples.ndim) != want:
        raise OptionError(
            f"{name} has shape {tuple(samples.shape)} but {_host.model_family(model)} models take {want[0]}-channel "
            f"{want[1] - 2}-D latents; {fix}."
        )
    return samples


def copy_weight(weight: torch.Tensor) -> torch.Tensor:
    # Any weight (or bias) function makes ComfyUI's ops hand it a fresh copy of the tensor; that
    # copy is an ordinary tensor even when the stored one was made under inference mode (every
    # MODEL a node loads), which autograd refuses to save for the backward pass (layer norms
    # save their weight and bias, linear layers their weight).
    return weight


def copy_other_weights(student: Any, adapters: Mapping[str, Any]) -> None:
    """Give every weight and bias of ``student`` without an adapter the copying wrapper.

    Weights loaded under inference mode cannot be saved for backward; their copies can (see
    :func:`copy_weight`). Shared by Refine and Train LoRA-X.
    """
    for name, module in student.model.named_modules():
        if not hasattr(module, "weight_function"):
            continue
        for part in ("weight", "bias"):
            key = f"{name}.{part}"
            if getattr(module, part, None) is not None and key not in adapters:
                student.add_weight_wrapper(key, copy_weight)


@contextmanager
def trainable(student: Any, adapters: Mapping[str, Any]) -> Iterator[None]:
    """Load ``student`` for training; undo on the way out what that changed on the shared model.

    The clone shares its modules with the target ``MODEL``, so the weight functions ComfyUI
    installs on them, the checkpointed forwards and ``requires_grad`` are all restored, also on
    Cancel or error.
    """
    grads = {p: p.requires_grad for p in student.model.parameters()}
    blocks = find_all_highest_child_module_with_forward(student.model.diffusion_model)
    try:
        student.model.requires_grad_(False)
        # Activations of one block at a time (recomputed in the backward pass), gradients for the
        # LoRA factors only and one model on the GPU are what is meant to make SDXL trainable in
        # 12–16 GB (not measured yet).
        for module in blocks:
            patch(module)
        # The target may still be loaded (its own predictions just ran), and ComfyUI does not
        # re-patch a loaded model for a clone without new weight patches, so the weight wrappers
        # would never be installed: detach it first. Then free the GPU of every other model
        # (Train LoRA's memory_required=1e20) and load the student.
        student.detach()
        comfy.model_management.load_models_gpu([student], memory_required=1e20, force_full_load=True)
        yield
    finally:
        for module in blocks:
            unpatch(module)
        ours = {id(f) for f in (*adapters.values(), copy_weight)}
        for module in student.model.modules():
            for attr in ("weight_function", "bias_function"):
                if getattr(module, attr, None):
                    setattr(module, attr, [f for f in getattr(module, attr) if id(f) not in ours])
        for p, flag in grads.items():
            if p.requires_grad != flag:
                # ComfyUI's weights keep requires_grad=True; an inference tensor's flag can only
                # be set back to True inside inference mode.
                with torch.inference_mode(p.is_inference()):
                    p.requires_grad_(flag)
