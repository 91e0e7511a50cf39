"""Compare LoRA Transfer: the same prompt, seed and sampler on every variant, as one labelled image grid."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from . import _compare_host, _host, _refine_host
from ._grid import image_grid
from ._ui import CATEGORY, NO_LORA, TIP_REFINE_LORA_MODEL, node_errors, report_ui

DISPLAY_NAME = "Compare LoRA Transfer"

TIP_CMP_SOURCE = "The base model the LoRA was trained on, loaded as a MODEL (e.g. Load Checkpoint). Not modified."
TIP_CMP_TARGET = "The model the LoRA was transferred onto (Transfer LoRA's target). Not modified."
TIP_CMP_TRANSFERRED = "The LoRA from Transfer LoRA."
TIP_CMP_REFINED = "Optional: the LoRA from Refine Transferred LoRA, shown as one more row."
TIP_CMP_LORA_NAME = (
    "The LoRA file the transfer started from (trained on source_model): applied to the source, and loaded "
    "directly onto the target for comparison. Ignored when a LORA_MODEL is connected."
)
TIP_CMP_POSITIVE = "The prompt of every row (CLIP Text Encode). The LoRAs' text-encoder layers are not applied."
TIP_CMP_NEGATIVE = "The negative prompt of every row."
TIP_CMP_LATENT = "Size and batch size (Empty Latent Image): one column per batch entry."
TIP_CMP_VAE = "Decodes every row (the models share a family, so one VAE)."
TIP_CMP_STRENGTH = "Strength of every row's LoRA on the diffusion model (1.0 = as trained)."


class LoraXCompareTransfer(io.ComfyNode):
    """Samples source + LoRA, the bare target, the target with the LoRA copied, transferred and refined, side by side."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        loras = _host.lora_names()
        return io.Schema(
            node_id="LoraXCompareTransfer",
            display_name=DISPLAY_NAME,
            category=CATEGORY,
            description=(
                "Answers \"did the transfer help?\" with pictures: samples the source with its LoRA, the target "
                "without LoRA, the target with the LoRA loaded directly, with the transferred LoRA and (when "
                "connected) with the refined one — same prompt, seed and sampler settings, ComfyUI's own "
                "sampler — and returns one labelled grid (one row each, one column per latent in the batch)."
            ),
            inputs=[
                io.Model.Input("source_model", tooltip=TIP_CMP_SOURCE),
                io.Model.Input("target_model", tooltip=TIP_CMP_TARGET),
                io.LoraModel.Input("transferred", tooltip=TIP_CMP_TRANSFERRED),
                io.Conditioning.Input("positive", tooltip=TIP_CMP_POSITIVE),
                io.Conditioning.Input("negative", tooltip=TIP_CMP_NEGATIVE),
                io.Latent.Input("latent", tooltip=TIP_CMP_LATENT),
                io.Vae.Input("vae", tooltip=TIP_CMP_VAE),
                io.Combo.Input("lora_name", options=[NO_LORA, *loras], default=loras[0] if loras else NO_LORA,
                               tooltip=TIP_CMP_LORA_NAME),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The noise seed of every row."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps of every row."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale of every row."),
                io.Combo.Input("sampler_name", options=_compare_host.SAMPLERS, default="euler",
                               tooltip="The sampler of every row (as in KSampler)."),
                io.Combo.Input("scheduler", options=_compare_host.SCHEDULERS, default="normal",
                               tooltip="The scheduler of every row (as in KSampler)."),
                io.Float.Input("strength", default=1.0, min=-20.0, max=20.0, step=0.01, tooltip=TIP_CMP_STRENGTH),
                io.LoraModel.Input("refined", optional=True, tooltip=TIP_CMP_REFINED),
                io.LoraModel.Input("lora", optional=True, tooltip=TIP_REFINE_LORA_MODEL),
            ],
            outputs=[io.Image.Output(display_name="grid", tooltip="One labelled row per variant, one column per "
                                     "latent; connect Save Image or Preview Image.")],
        )

    @classmethod
    def execute(cls, source_model, target_model, transferred, positive, negative, latent, vae, lora_name: str,
                seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, strength: float,
                refined=None, lora=None) -> io.NodeOutput:
        settings = _compare_host.Settings(positive, negative, latent, int(seed), int(steps), float(cfg),
                                          sampler_name, scheduler)
        with node_errors(DISPLAY_NAME):
            source_lora = _refine_host.source_lora_tensors(None if lora_name == NO_LORA else lora_name, lora)
            rows = _compare_host.row_models(source_model, target_model, source_lora, transferred, refined,
                                            float(strength))
            images = _compare_host.sample_rows(rows, settings, vae)
        title = settings.describe(float(strength))
        grid = image_grid(images, title)
        text = "\n".join([f"{DISPLAY_NAME}: {title}", *(f"  row {i + 1}: {label}"
                                                        + (f" — {x}" if isinstance(x, str) else "")
                                                        for i, (label, x) in enumerate(images))])
        return io.NodeOutput(grid, ui=report_ui(text))
