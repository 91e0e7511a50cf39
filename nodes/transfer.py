"""Transfer LoRA: move a LoRA from its source base model onto a target model, without data or training."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..lorax_core.pipeline import check_source_bases
from ..lorax_core.transfer import transfer_adapter
from . import _host
from ._types import LoraxSimilarity, LoraxSource
from ._ui import (
    CATEGORY,
    METHOD_CHOICES,
    NO_LORA,
    TIP_LORA_MODEL,
    TIP_LORA_NAME,
    TIP_METHOD,
    TIP_RANK,
    TIP_SIMILARITY,
    TIP_SOURCE,
    TIP_TARGET,
    TIP_TARGET_CLIP,
    TIP_THRESHOLD,
    TIP_USE_CACHE,
    node_errors,
    provenance,
    report_text,
    report_ui,
    transfer_options,
    transfer_view,
)

DISPLAY_NAME = "Transfer LoRA"


class LoraXTransferLoRA(io.ComfyNode):
    """Projects each LoRA layer onto the target's weight subspaces (LoRA-X / ProLoRA)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        loras = _host.lora_names()
        return io.Schema(
            node_id="LoraXTransferLoRA",
            display_name=DISPLAY_NAME,
            category=CATEGORY,
            description=(
                "Training-free LoRA transfer: each layer's update is projected from the source base model's "
                "singular subspaces onto the target's (LoRA-X, arXiv 2501.16559; ProLoRA, arXiv 2506.04244). "
                "Layers whose subspaces are not similar enough are skipped and listed in the report."
            ),
            inputs=[
                LoraxSource.Input("source", tooltip=TIP_SOURCE),
                io.Model.Input("target", tooltip=TIP_TARGET),
                io.Combo.Input("lora_name", options=[NO_LORA, *loras], default=loras[0] if loras else NO_LORA,
                               tooltip=TIP_LORA_NAME),
                io.Combo.Input("method", options=list(METHOD_CHOICES), default="auto", tooltip=TIP_METHOD),
                io.Int.Input("rank", default=320, min=1, max=4096, tooltip=TIP_RANK),
                io.Float.Input("threshold", default=0.5, min=0.0, max=1.0, step=0.01, tooltip=TIP_THRESHOLD),
                io.Boolean.Input("use_cache", default=True, tooltip=TIP_USE_CACHE),
                io.Clip.Input("target_clip", optional=True, tooltip=TIP_TARGET_CLIP),
                io.LoraModel.Input("lora", optional=True, tooltip=TIP_LORA_MODEL),
                LoraxSimilarity.Input("similarity", optional=True, tooltip=TIP_SIMILARITY),
            ],
            outputs=[
                io.LoraModel.Output(display_name="lora", tooltip="The transferred LoRA (ComfyUI-native keys)."),
                io.String.Output(display_name="report", tooltip="What happened to every layer, as text."),
            ],
        )

    @classmethod
    def execute(cls, source, target, lora_name: str, method: str, rank: int, threshold: float,
                use_cache: bool = True, target_clip=None, lora=None, similarity=None) -> io.NodeOutput:
        with node_errors(DISPLAY_NAME):
            lora_file = _host.load_lora_file(None if lora_name == NO_LORA else lora_name, lora)
            target_weights = _host.PatcherWeights(target, target_clip)
            plan = _host.plan_transfer(lora_file, source, target, target_clip, target_weights.key_map)
            options = transfer_options(method, rank, threshold, _host.compute_device())
            cache = _host.subspace_cache(use_cache)
            bases_note = check_source_bases(lora_file, plan, source.weights, cache, options.device)
            result = transfer_adapter(
                plan.layers, source.weights, target_weights, options, names=plan.names, skipped=plan.skipped,
                similarity=similarity, cache=cache, progress=_host.progress_callback(),
            )
            lora_name_used = "LORA_MODEL input" if lora is not None else lora_name
            meta = provenance(lora_file, result, options, source, _host.model_family(target),
                              target_weights.fingerprint, lora_name_used)
            out = _host.wrap_result(result, plan, lora_file, meta)
        title = f"{lora_name_used}: {source.family} → {_host.model_family(target)}"
        text = report_text(result.report, title)
        text = f"{text}\n{bases_note}" if bases_note else text
        return io.NodeOutput(out, text, ui=report_ui(text, transfer_view(result.report, title)))
