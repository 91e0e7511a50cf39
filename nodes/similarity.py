"""Compute Subspace Similarity: how much each layer's top singular subspaces moved, as a chart."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..lorax_core.similarity import compute_similarity
from . import _host
from ._chart import similarity_chart
from ._types import LoraxSimilarity, LoraxSource
from ._ui import (
    CATEGORY,
    NO_LORA,
    TIP_RANK,
    TIP_SIM_LORA,
    TIP_SOURCE,
    TIP_TARGET,
    TIP_TARGET_CLIP,
    TIP_THRESHOLD,
    TIP_USE_CACHE,
    node_errors,
    report_ui,
    similarity_view,
)

DISPLAY_NAME = "Compute Subspace Similarity"


class LoraXSubspaceSimilarity(io.ComfyNode):
    """Φ per layer between the source and target base weights (LoRA-X Eq. 4), with chance level."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraXSubspaceSimilarity",
            display_name=DISPLAY_NAME,
            category=CATEGORY,
            description=(
                "Compares the top-R singular subspaces of the source and target base weights layer by layer "
                "(Φ of LoRA-X, arXiv 2501.16559, Eq. 4) against chance level. Layers below the threshold "
                "would be skipped by Transfer LoRA; connect the result there to reuse it."
            ),
            inputs=[
                LoraxSource.Input("source", tooltip=TIP_SOURCE),
                io.Model.Input("target", tooltip=TIP_TARGET),
                io.Clip.Input("target_clip", optional=True, tooltip=TIP_TARGET_CLIP),
                io.Combo.Input("lora_name", options=[NO_LORA, *_host.lora_names()], default=NO_LORA, tooltip=TIP_SIM_LORA),
                io.Int.Input("rank", default=320, min=1, max=4096, tooltip=TIP_RANK),
                io.Float.Input("threshold", default=0.5, min=0.0, max=1.0, step=0.01, tooltip=TIP_THRESHOLD),
                io.Boolean.Input("use_cache", default=True, tooltip=TIP_USE_CACHE),
            ],
            outputs=[
                LoraxSimilarity.Output(display_name="similarity", tooltip="Per-layer similarity, for Transfer LoRA."),
                io.Image.Output(display_name="chart", tooltip="One bar per layer: Φ, threshold and chance level."),
                io.String.Output(display_name="summary", tooltip="Counts and the least similar layers, as text."),
            ],
        )

    @classmethod
    def execute(cls, source, target, lora_name: str, rank: int, threshold: float, use_cache: bool = True,
                target_clip=None) -> io.NodeOutput:
        with node_errors(DISPLAY_NAME):
            # The pre-check reads names and shapes only: a cross-family or cross-size pair is
            # explained (or refused) before any decomposition.
            target_weights, pairs, notes = _host.similarity_inputs(source, target, target_clip, lora_name, NO_LORA)
            table = compute_similarity(
                source.weights, target_weights, pairs, rank, threshold,
                cache=_host.subspace_cache(use_cache), device=_host.compute_device(), progress=_host.progress_callback(),
            )
        text = f"{notes}\n{table.summary()}" if notes else table.summary()
        view = similarity_view(table, f"{source.name} → {_host.model_family(target)}")
        return io.NodeOutput(table, similarity_chart(table), text, ui=report_ui(text, view))
