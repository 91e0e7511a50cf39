"""Save Transferred LoRA: write a LORA_MODEL into <loras>/lorax/ so every LoRA loader lists it."""

from __future__ import annotations

from comfy_api.v0_0_2 import io, ui

from . import _host
from ._ui import CATEGORY, TIP_FILE_NAME, TIP_LORA, check_file_name, node_errors

DISPLAY_NAME = "Save Transferred LoRA"
# File names are limited to 255 bytes on common file systems (ext4, NTFS, APFS); a saved LoRA
# may get a counter and writes a report next to it.
_NAME_MAX = 255
_LONGEST_SUFFIX = "_00000.safetensors"


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
        if checked is True:
            # The longest name the node may write: the stem, a counter and the suffix (the
            # .report.json next to it is no longer).
            longest = len(file_name.strip().removesuffix(".safetensors").encode()) + len(_LONGEST_SUFFIX)
            if longest > _NAME_MAX:
                return (
                    f"{DISPLAY_NAME}: file_name is too long ({longest - len(_LONGEST_SUFFIX)} bytes; at most "
                    f"{_NAME_MAX - len(_LONGEST_SUFFIX)} leave room for a counter and the suffix); shorten it."
                )
        return checked if checked is True else f"{DISPLAY_NAME}: {checked}"

    @classmethod
    def execute(cls, lora, file_name: str) -> io.NodeOutput:
        with node_errors(DISPLAY_NAME):
            path = _host.save_lora(lora, file_name.strip())
        name = _host.loras_relative_name(path)
        return io.NodeOutput(name, ui=ui.PreviewText(f"saved {name} ({path})"))
