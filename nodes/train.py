"""Train LoRA-X: make a LoRA-X adapter in the graph (Save LoRA-X, in ``save.py``, writes it for every loader)."""

from __future__ import annotations

from statistics import median

import torch
from comfy_api.v0_0_2 import io, ui

from . import _host, _train_host
from ._loss_chart import loss_chart
from ._ui import CATEGORY, node_errors

TRAIN_NAME = "Train LoRA-X"

TIP_TRAIN_MODEL = "The model to train on (not modified). Its weights define the LoRA-X bases, so it is the source model a transfer of the result needs."
TIP_TRAIN_LATENTS = (
    "Training images as latents (VAE Encode of your images, batched); each step draws batch_size of them."
)
TIP_TRAIN_POSITIVE = "The caption: one conditioning for all latents, or one per latent in the same order."
TIP_TRAIN_STEPS = "Optimizer steps (AdamW on the ΔΣ values only)."
TIP_TRAIN_LR = (
    "AdamW learning rate of ΔΣ. ΔΣ adds to singular values of order 1–100, so LoRA-X takes larger rates than LoRA."
)
TIP_TRAIN_RANK = (
    "R: how many top singular directions of each weight get a trainable ΔΣ value (paper: 320). Clipped per layer."
)
TIP_TRAIN_LAYERS = (
    "Which weights to adapt: attention projections; + feed-forward layers; every linear layer; "
    "every linear and 2-D conv layer."
)
TIP_TRAIN_BATCH = "Latents per step."
TIP_TRAIN_SEED = "Seeds noise, timesteps and batch order: the same inputs and seed give the same adapter."
TIP_TRAIN_DTYPE = "Compute dtype of the model while training (ΔΣ itself stays float32). bf16 halves activation memory."
TIP_TRAIN_CACHE = (
    "Take the bases from the subspace cache the transfer uses (user/__lorax/subspace-cache), computing "
    "and storing missing ones. Off: compute them in memory only."
)


class LoraXTrainLoRAX(io.ComfyNode):
    """Trains LoRA-X cores (ΔΣ in the weights' top-R singular bases) with ComfyUI's training machinery."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraXTrainLoRAX",
            display_name=TRAIN_NAME,
            category=CATEGORY,
            description=(
                "Trains a LoRA-X adapter: for each chosen weight W = UΣVᵀ only ΔΣ on its top-R singular directions "
                "is learnt, ΔW = U_R·diag(ΔΣ)·V_Rᵀ (LoRA-X, arXiv 2501.16559), with ComfyUI's Train LoRA machinery "
                "(noise, timesteps, x0 MSE loss, progress). The adapter lives in the model's own subspaces, which "
                "is what lets Transfer LoRA move it to a fine-tune of the model."
            ),
            inputs=[
                io.Model.Input("model", tooltip=TIP_TRAIN_MODEL),
                io.Latent.Input("latents", tooltip=TIP_TRAIN_LATENTS),
                io.Conditioning.Input("positive", tooltip=TIP_TRAIN_POSITIVE),
                io.Int.Input("steps", default=200, min=1, max=100000, tooltip=TIP_TRAIN_STEPS),
                io.Float.Input(
                    "learning_rate", default=0.001, min=0.000001, max=1.0, step=0.0001, tooltip=TIP_TRAIN_LR
                ),
                io.Int.Input("rank", default=320, min=1, max=4096, tooltip=TIP_TRAIN_RANK),
                io.Combo.Input(
                    "layers", options=list(_train_host.LAYER_KINDS), default="attention", tooltip=TIP_TRAIN_LAYERS
                ),
                io.Int.Input("batch_size", default=1, min=1, max=256, tooltip=TIP_TRAIN_BATCH),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip=TIP_TRAIN_SEED),
                io.Combo.Input("training_dtype", options=["bf16", "fp32"], default="bf16", tooltip=TIP_TRAIN_DTYPE),
                io.Boolean.Input("use_cache", default=True, tooltip=TIP_TRAIN_CACHE),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The input model with the trained adapter applied."),
                io.LoraModel.Output(
                    display_name="lorax",
                    tooltip="The LoRA-X adapter (ΔΣ per layer) for Transfer LoRA's lora input or Save LoRA-X.",
                ),
                io.LoraModel.Output(
                    display_name="lora",
                    tooltip="The same ΔW as a rank-R standard LoRA, for Load "
                    "LoRA Model and the other stock LoRA nodes.",
                ),
                io.Image.Output(
                    display_name="loss_curve", tooltip="Training loss per step (light) and its running mean."
                ),
                io.String.Output(
                    display_name="report", tooltip="What was trained, the losses and the layers left out."
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        latents,
        positive,
        steps: int,
        learning_rate: float,
        rank: int,
        layers: str,
        batch_size: int,
        seed: int,
        training_dtype: str,
        use_cache: bool = True,
    ) -> io.NodeOutput:
        dtype = torch.bfloat16 if training_dtype == "bf16" else torch.float32
        with node_errors(TRAIN_NAME):
            setup = _train_host.prepare(model, latents, positive, layers)
            outcome = _train_host.train(
                model,
                setup,
                rank=int(rank),
                steps=int(steps),
                lr=float(learning_rate),
                batch=int(batch_size),
                seed=int(seed),
                dtype=dtype,
                use_cache=bool(use_cache),
            )
            trained = _train_host.trained_model(model, outcome.standard)
        family = _host.model_family(model)
        outcome.metadata.update(
            {
                "lorax.origin": TRAIN_NAME,
                "lorax.source_family": family,
                "lorax.train.steps": str(int(steps)),
                "lorax.train.learning_rate": str(float(learning_rate)),
                "lorax.train.layers": layers,
                "lorax.train.images": str(setup.latents.shape[0]),
                "lorax.train.seed": str(int(seed)),
            }
        )
        adapter = _train_host.wrap_adapter(outcome)
        text = _report(outcome, setup, family, int(rank), layers)
        title = f"LoRA-X R={int(rank)}, {len(outcome.factors)} layers, {layers}"
        return io.NodeOutput(
            trained,
            adapter,
            _train_host.standard_tensors(outcome.standard),
            loss_chart(outcome.losses, title),
            text,
            ui=ui.PreviewText(text),
        )


def _report(
    outcome: _train_host.TrainOutcome, setup: _train_host.TrainSetup, family: str, rank: int, layers: str
) -> str:
    params = sum(f.core.numel() for f in outcome.factors.values())
    lines = [
        f"Train LoRA-X on {family}: {len(outcome.factors)} {layers} layers, R={rank}, {params} trained values "
        f"(ΔΣ), {setup.latents.shape[0]} latents, {len(outcome.losses)} steps."
    ]
    if outcome.clipped:
        lines.append(
            f"{outcome.clipped} of the layers {'is' if outcome.clipped == 1 else 'are'} narrower than R: "
            "R was clipped to the layer's width."
        )
    losses = outcome.losses
    if len(losses) >= 4:
        quarter = len(losses) // 4
        # Medians: a step at a very high noise level can weigh more than several others.
        lines.append(
            f"Training loss (median of the first → last quarter of the steps): {median(losses[:quarter]):.4g}"
            f" → {median(losses[-quarter:]):.4g}."
        )
    lines.extend(f"Not trained: {count} weights, {reason}." for reason, count in sorted(setup.excluded.items()))
    lines.append(
        f"Bases: the model's own (fingerprint {outcome.metadata['lorax.source_fingerprint']}); transfer the "
        "adapter from this model (Load Source Model on its file)."
    )
    return "\n".join(lines)
