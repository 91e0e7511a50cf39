"""Refine Transferred LoRA (data-free): distil the LoRA's effect on the source onto the target."""

from __future__ import annotations

from statistics import median

from comfy_api.v0_0_2 import io, ui

from ..lorax_core.refine import OBJECTIVES, RefineOptions
from . import _host, _refine_host
from ._loss_chart import loss_chart
from ._ui import (
    CATEGORY,
    NO_LORA,
    TIP_BATCH,
    TIP_CFG,
    TIP_KEEP_GUIDANCE,
    TIP_LATENT,
    TIP_LEARNING_RATE,
    TIP_NEUTRAL,
    TIP_OBJECTIVE,
    TIP_OUTPUT_WEIGHT,
    TIP_POSITIVE,
    TIP_PROBES,
    TIP_REFINE_LORA_MODEL,
    TIP_REFINE_LORA_NAME,
    TIP_REFINE_SEED,
    TIP_REFINE_SOURCE_MODEL,
    TIP_REFINE_STEPS,
    TIP_REFINE_TARGET_MODEL,
    TIP_SAMPLE_STEPS,
    TIP_TRANSFERRED,
    node_errors,
)

DISPLAY_NAME = "Refine Transferred LoRA (data-free)"
#: The widgets' defaults are the core's (the settings the quality benchmark validated on every target).
DEFAULTS = RefineOptions()


class LoraXRefineTransferredLoRA(io.ComfyNode):
    """Optimises the transferred LoRA's factors on the target so it reproduces the LoRA's effect on the source."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        loras = _host.lora_names()
        return io.Schema(
            node_id="LoraXRefineTransferredLoRA",
            display_name=DISPLAY_NAME,
            category=CATEGORY,
            description=(
                "Data-free refinement after Transfer LoRA: the source model with its LoRA and the target generate "
                "a few images, which are re-noised at random timesteps; the transferred LoRA's factors are then "
                "optimised so that the target with the LoRA predicts what the source with the LoRA does on them "
                "(distillation without training images, after Trans-LoRA, arXiv 2405.17258). The result is a "
                "LoRA of the same rank and key style."
            ),
            inputs=[
                io.Model.Input("source_model", tooltip=TIP_REFINE_SOURCE_MODEL),
                io.Model.Input("target_model", tooltip=TIP_REFINE_TARGET_MODEL),
                io.LoraModel.Input("transferred", tooltip=TIP_TRANSFERRED),
                io.Conditioning.Input("positive", tooltip=TIP_POSITIVE),
                io.Latent.Input("latent", tooltip=TIP_LATENT),
                io.Combo.Input("lora_name", options=[NO_LORA, *loras], default=loras[0] if loras else NO_LORA,
                               tooltip=TIP_REFINE_LORA_NAME),
                io.Combo.Input("objective", options=list(OBJECTIVES), default=DEFAULTS.objective,
                               tooltip=TIP_OBJECTIVE),
                io.Float.Input("output_weight", default=DEFAULTS.output_weight, min=0.0, max=1.0, step=0.05,
                               tooltip=TIP_OUTPUT_WEIGHT),
                io.Float.Input("keep_guidance", default=DEFAULTS.keep_guidance, min=0.0, max=100.0, step=0.05,
                               tooltip=TIP_KEEP_GUIDANCE),
                io.Int.Input("steps", default=DEFAULTS.steps, min=0, max=100000, tooltip=TIP_REFINE_STEPS),
                io.Float.Input("learning_rate", default=DEFAULTS.lr, min=0.00001, max=1.0, step=0.0001,
                               tooltip=TIP_LEARNING_RATE),
                io.Int.Input("probes", default=DEFAULTS.probes, min=8, max=8192, tooltip=TIP_PROBES),
                io.Int.Input("sample_steps", default=12, min=1, max=200, tooltip=TIP_SAMPLE_STEPS),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, tooltip=TIP_CFG),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip=TIP_REFINE_SEED),
                io.Int.Input("batch", default=DEFAULTS.batch, min=1, max=256, tooltip=TIP_BATCH),
                io.Conditioning.Input("neutral", optional=True, tooltip=TIP_NEUTRAL),
                io.LoraModel.Input("lora", optional=True, tooltip=TIP_REFINE_LORA_MODEL),
            ],
            outputs=[
                io.LoraModel.Output(display_name="lora", tooltip="The refined LoRA: same layers, rank and key style, "
                                    "with lorax.refine.* provenance."),
                io.Image.Output(display_name="loss_curve",
                                tooltip="Training loss per step (light) and its running mean."),
                io.String.Output(display_name="report", tooltip="The transfer's header, the losses and what was kept."),
            ],
        )

    @classmethod
    def execute(cls, source_model, target_model, transferred, positive, latent, lora_name: str, objective: str,
                output_weight: float, steps: int, learning_rate: float, probes: int, sample_steps: int, cfg: float,
                seed: int, batch: int, keep_guidance: float = DEFAULTS.keep_guidance, neutral=None,
                lora=None) -> io.NodeOutput:
        with node_errors(DISPLAY_NAME):
            setup = _refine_host.prepare(source_model, target_model, transferred, positive, neutral, latent,
                                         None if lora_name == NO_LORA else lora_name, lora)
            options = RefineOptions(objective=objective, output_weight=float(output_weight),
                                    keep_guidance=float(keep_guidance), steps=int(steps), lr=float(learning_rate),
                                    batch=int(batch), probes=int(probes), seed=int(seed))
            outcome = _refine_host.run(setup, options, int(sample_steps), float(cfg))
        result, meta = outcome.result, outcome.result.metadata()
        refined = _refine_host.wrap_refined(transferred, outcome.layers, meta)
        lines = [_header(transferred, target_model), result.summary(), _trend(result.losses),
                 _generations(outcome, setup)]
        text = "\n".join(line for line in lines if line)
        title = (f"{meta['lorax.refine.objective']}: held-out loss {result.holdout_before:.4g} -> "
                 f"{result.holdout_after:.4g} ({result.kept})")
        chart = loss_chart(result.losses, title)
        return io.NodeOutput(refined, chart, text, ui=ui.PreviewText(text))


def _header(transferred, target_model) -> str:
    meta = transferred.metadata
    first = transferred.report.summary().splitlines()[0]
    return (f"{meta.get('lorax.source_lora', 'LoRA')}: {meta.get('lorax.source_family', '?')} → "
            f"{_host.model_family(target_model)}\n{first}")


def _generations(outcome: _refine_host.RefineOutcome, setup: _refine_host.RefineSetup) -> str:
    teacher, start = outcome.generations
    neutral = " + the neutral prompt" if setup.neutral_given else " + the first prompt zeroed out as the neutral one"
    by = ", ".join([*([f"{teacher} by the source with its LoRA"] if teacher else []),
                    *([f"{start} by the target with the transferred LoRA"] if start else [])])  # fmt: skip
    return (f"Probes from {teacher + start} generations ({by}), {setup.prompts} prompt(s){neutral}; "
            f"{len(outcome.layers)} diffusion-model layers refined.")


def _trend(losses: list[float]) -> str:
    # Medians, not means: one probe at a very low noise level can weigh more than a whole batch.
    if len(losses) < 4:
        return ""
    quarter = len(losses) // 4
    return (f"Training loss (median of the first → last quarter of the steps): {median(losses[:quarter]):.4g} → "
            f"{median(losses[-quarter:]):.4g}.")
