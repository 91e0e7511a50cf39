"""Save Transferred LoRA: write a LORA_MODEL into <loras>/lorax/ so every LoRA loader lists it."""

from __future__ import annotations

from comfy_api.v0_0_2 import io, ui

from . import _host
from ._ui import CATEGORY, TIP_FILE_NAME, TIP_LORA, check_file_name, node_errors

DISPLAY_NAME = "Save Transferred LoRA"


class LoraXSaveTransferredLoRA(io.ComfyNode):
    """Writes the LoRA in the source file's key style with provenance metadata; never overwrites."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraXSaveTransferredLoRA",
            display_name=DISPLAY_NAME,
            category=CATEGORY,
            description=(
                "Saves a transferred LoRA as .safetensors into the first loras folder under lorax/, in the "
                "source LoRA's key style (kohya, PEFT or ComfyUI) with provenance metadata and a .report.json "
                "next to it. An existing file is never replaced."
            ),
            inputs=[
                io.LoraModel.Input("lora", tooltip=TIP_LORA),
                io.String.Input("file_name", default="lorax_transferred", tooltip=TIP_FILE_NAME),
            ],
            outputs=[io.String.Output(display_name="lora_name", tooltip="The saved file's name as LoRA loaders list it.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, file_name: str) -> bool | str:
        checked = check_file_name(file_name)
        return checked if checked is True else f"{DISPLAY_NAME}: {checked}"

    @classmethod
    def execute(cls, lora, file_name: str) -> io.NodeOutput:
        with node_errors(DISPLAY_NAME):
            path = _host.save_lora(lora, file_name.strip())
        name = _host.loras_relative_name(path)
        return io.NodeOutput(name, ui=ui.PreviewText(f"saved {name} ({path})"))
