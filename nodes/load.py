"""Load Source Model (LoRA-X): a lazy handle on the model file a LoRA was trained on."""

from __future__ import annotations

from pathlib import Path

from comfy_api.v0_0_2 import io, ui

from . import _host
from ._types import LoraxSource
from ._ui import CATEGORY, TIP_SOURCE, TIP_SOURCE_FILE, node_errors

DISPLAY_NAME = "Load Source Model (LoRA-X)"
SAFE_SUFFIXES = (".safetensors", ".sft", ".gguf")


class LoraXLoadSourceModel(io.ComfyNode):
    """Opens the source model lazily: reads the header now, single tensors during a transfer."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraXLoadSourceModel",
            display_name=DISPLAY_NAME,
            category=CATEGORY,
            description=(
                "Opens the base model a LoRA was trained on, without building it: only the weights a "
                "transfer needs are read later (LoRA-X, arXiv 2501.16559)."
            ),
            inputs=[io.Combo.Input("source_model", options=_host.source_model_names(), tooltip=TIP_SOURCE_FILE)],
            outputs=[LoraxSource.Output(display_name="source", tooltip=TIP_SOURCE)],
        )

    @classmethod
    def validate_inputs(cls, source_model: str) -> bool | str:
        if Path(source_model).suffix.lower() not in SAFE_SUFFIXES:
            return (
                f"{DISPLAY_NAME}: {source_model!r} is a pickle file, which can run code when loaded; "
                "convert it to .safetensors (or .gguf) first."
            )
        if source_model not in _host.source_model_names():
            return f"{DISPLAY_NAME}: {source_model!r} is not in the checkpoints or diffusion_models folders; refresh (R)."
        return True

    @classmethod
    def fingerprint_inputs(cls, source_model: str) -> str:
        return _host.source_fingerprint(source_model)

    @classmethod
    def execute(cls, source_model: str) -> io.NodeOutput:
        with node_errors(DISPLAY_NAME):
            source = _host.open_source(source_model)
        return io.NodeOutput(source, ui=ui.PreviewText(source.describe()))
