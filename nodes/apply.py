"""Apply Transferred LoRA: patch a MODEL (and CLIP) with a LORA_MODEL, on clones."""

from __future__ import annotations

from comfy_api.v0_0_2 import io, ui

from . import _host
from ._ui import CATEGORY, TIP_CLIP, TIP_LORA, TIP_MODEL, TIP_STRENGTH_CLIP, TIP_STRENGTH_MODEL, node_errors

DISPLAY_NAME = "Apply Transferred LoRA"


class LoraXApplyTransferredLoRA(io.ComfyNode):
    """Like the stock LoRA loader, but for a LoRA held in memory, and loud when nothing fits."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraXApplyTransferredLoRA",
            display_name=DISPLAY_NAME,
            category=CATEGORY,
            description=(
                "Applies a LoRA from another node (e.g. Transfer LoRA) to a model and optionally its CLIP. "
                "Returns patched copies; the inputs are not modified. Fails with a clear message if no layer fits."
            ),
            inputs=[
                io.Model.Input("model", tooltip=TIP_MODEL),
                io.Clip.Input("clip", optional=True, tooltip=TIP_CLIP),
                io.LoraModel.Input("lora", tooltip=TIP_LORA),
                io.Float.Input("strength_model", default=1.0, min=-20.0, max=20.0, step=0.01, tooltip=TIP_STRENGTH_MODEL),
                io.Float.Input("strength_clip", default=1.0, min=-20.0, max=20.0, step=0.01, tooltip=TIP_STRENGTH_CLIP),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The patched model (a clone)."),
                io.Clip.Output(display_name="clip", tooltip="The patched CLIP (a clone), or the input when none."),
            ],
        )

    @classmethod
    def execute(cls, model, lora, strength_model: float, strength_clip: float, clip=None) -> io.NodeOutput:
        with node_errors(DISPLAY_NAME):
            applied = _host.apply_lora(model, clip, lora, strength_model, strength_clip)
        text = (
            f"applied {len(applied.patched_model)} model and {len(applied.patched_clip)} text-encoder weights "
            f"from {applied.layers} LoRA layers"
        )
        return io.NodeOutput(applied.model, applied.clip, ui=ui.PreviewText(text))
