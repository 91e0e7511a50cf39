"""Migrate LoRA Folder: move every LoRA of a ``loras`` sub-folder onto a target model in one run.

A node of its own rather than a mode of Save Transferred LoRA: Save takes one ``LORA_MODEL``
produced by Transfer LoRA, while a folder run takes the source, the target and a folder and
produces files and a summary; as one node, half of its inputs would be unused in either mode.
"""

from __future__ import annotations

from comfy_api.v0_0_2 import io, ui

from ..lorax_core.library import SUMMARY_MD, migrate_library
from . import _host
from ._types import LoraxSource
from ._ui import (
    CATEGORY,
    METHOD_CHOICES,
    TIP_LORA_FOLDER,
    TIP_METHOD,
    TIP_RANK,
    TIP_SOURCE,
    TIP_TARGET,
    TIP_TARGET_CLIP,
    TIP_TARGET_NAME,
    TIP_THRESHOLD,
    TIP_USE_CACHE,
    check_file_name,
    model_infos,
    node_errors,
    transfer_options,
)

DISPLAY_NAME = "Migrate LoRA Folder"
#: Progress steps per file: the bar moves within a file too (per layer), and every step is a cancel point.
_STEPS = 1000


class LoraXMigrateLoRAFolder(io.ComfyNode):
    """Transfers a folder of LoRAs (base pair decomposed once), writes them under ``loras/lorax/<name>/``."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        folders = _host.lora_subfolders()
        return io.Schema(
            node_id="LoraXMigrateLoRAFolder",
            display_name=DISPLAY_NAME,
            category=CATEGORY,
            description=(
                "Moves a whole folder of LoRAs to the target model in one run: each LoRA is transferred as Transfer "
                "LoRA does (the base models are decomposed once for all of them) and saved under "
                "loras/lorax/<target_name>/ with the same relative path, in its own key style, with its .report.json. "
                "A summary table (problems first) is shown on the node and written as summary.md / summary.json. "
                "Cancel stops between layers; finished files stay, the unfinished one leaves nothing."
            ),
            inputs=[
                LoraxSource.Input("source", tooltip=TIP_SOURCE),
                io.Model.Input("target", tooltip=TIP_TARGET),
                io.Combo.Input("folder", options=folders, default=folders[0], tooltip=TIP_LORA_FOLDER),
                io.String.Input("target_name", default="", tooltip=TIP_TARGET_NAME),
                io.Combo.Input("method", options=list(METHOD_CHOICES), default="auto", tooltip=TIP_METHOD),
                io.Int.Input("rank", default=320, min=1, max=4096, tooltip=TIP_RANK),
                io.Float.Input("threshold", default=0.5, min=0.0, max=1.0, step=0.01, tooltip=TIP_THRESHOLD),
                io.Boolean.Input("use_cache", default=True, tooltip=TIP_USE_CACHE),
                io.Clip.Input("target_clip", optional=True, tooltip=TIP_TARGET_CLIP),
            ],
            outputs=[
                io.String.Output(display_name="summary", tooltip="The summary table (Markdown), problems first."),
                io.String.Output(display_name="folder",
                                 tooltip="The output folder as LoRA loaders list it (e.g. lorax/my_target)."),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, target_name: str) -> bool | str:
        if not target_name.strip():
            return True
        checked = check_file_name(target_name)
        return checked if checked is True else f"{DISPLAY_NAME}: {checked.replace('file_name', 'target_name')}"

    @classmethod
    def execute(cls, source, target, folder: str, target_name: str, method: str, rank: int, threshold: float,
                use_cache: bool = True, target_clip=None) -> io.NodeOutput:
        with node_errors(DISPLAY_NAME):
            lora_dir = _host.lora_subfolder(folder)
            target_weights = _host.PatcherWeights(target, target_clip)
            family = _host.model_family(target)
            out_dir = _host.save_folder() / (target_name.strip() or f"{family}_{target_weights.fingerprint[:8]}")
            source_info, target_info = model_infos(source, family, target_weights.fingerprint)
            bar = _host.progress_callback()  # raises ComfyUI's interrupt on Cancel: the batch stops there

            def progress(index: int, total: int, done: int, layers: int) -> None:
                bar(index * _STEPS + (done * _STEPS // layers if layers else 0), total * _STEPS)

            summary = migrate_library(
                lora_dir, out_dir, source.weights, target_weights,
                transfer_options(method, rank, threshold, _host.compute_device()),
                source_info=source_info, target_info=target_info, host="ComfyUI node pack",
                exclude=[_host.save_folder()], key_map=target_weights.key_map,
                host_rule=_host.clip_rule(target_clip), cache=_host.subspace_cache(use_cache), progress=progress,
            )  # fmt: skip
        text = summary.to_markdown()
        name = _host.loras_relative_name(out_dir)
        shown = f"{text}\nWritten to {name}/ (summary: {name}/{SUMMARY_MD})."
        return io.NodeOutput(text, name, ui=ui.PreviewText(shown))
