"""Transfer LoRA: move a LoRA from its source base model onto a target model, without data or training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from comfy_api.v0_0_2 import io

from ..lorax_core.cache import SubspaceCache
from ..lorax_core.formats import LoraFile
from ..lorax_core.pipeline import TransferJob, run_transfer
from ..lorax_core.types import TransferOptions
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
    model_infos,
    node_errors,
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
            options = transfer_options(method, rank, threshold, _host.compute_device())
            lora_name_used = "LORA_MODEL input" if lora is not None else lora_name
            job = transfer_in_host(lora_file, lora_name_used, source, target, target_clip, target_weights, options,
                                   _host.subspace_cache(use_cache), _host.progress_callback(), similarity)
            out = _host.wrap_result(job.result, job.plan, lora_file, job.metadata)
        title = f"{lora_name_used}: {source.family} → {_host.model_family(target)}"
        text = report_text(job.result.report, title)
        text = f"{text}\n{job.bases_note}" if job.bases_note else text
        return io.NodeOutput(out, text, ui=report_ui(text, transfer_view(job.result.report, title)))


def transfer_in_host(lora_file: LoraFile, lora_name: str, source: _host.SourceModel, target: Any, target_clip: Any,
                     target_weights: _host.PatcherWeights, options: TransferOptions, cache: SubspaceCache,
                     progress: Callable[[int, int], None], similarity: Any = None) -> TransferJob:
    """One LoRA onto a ComfyUI target: the core's one entry point (:func:`lorax_core.pipeline.run_transfer`)
    with the host's key map (from ``target_weights``), its text-encoder rule and its provenance names.
    Shared by Transfer LoRA and Migrate LoRA Folder."""
    source_info, target_info = model_infos(source, _host.model_family(target), target_weights.fingerprint)
    return run_transfer(
        lora_file, source.weights, target_weights, options, lora_name=lora_name, source_info=source_info,
        target_info=target_info, host="ComfyUI node pack", key_map=target_weights.key_map, source_name=source.name,
        host_rule=_host.clip_rule(target_clip), cache=cache, similarity=similarity, progress=progress,
    )
