"""The save nodes: Save Transferred LoRA (a LORA_MODEL) and Save LoRA-X (a trained LoRA-X adapter), into <loras>/lorax/."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from comfy_api.v0_0_2 import io, ui

from ..lorax_core.errors import FormatError
from ..lorax_core.formats import write_lora
from ..lorax_core.lorax_export import compress_standard
from ..lorax_core.types import AdapterLayer
from . import _host, _train_host
from ._ui import CATEGORY, TIP_FILE_NAME, TIP_LORA, check_file_name, node_errors

DISPLAY_NAME = "Save Transferred LoRA"
SAVE_NAME = "Save LoRA-X"
# File names are limited to 255 bytes on common file systems (ext4, NTFS, APFS); a saved LoRA
# may get a counter and writes a report next to it.
_NAME_MAX = 255
_LONGEST_SUFFIX = "_00000.safetensors"

TIP_SAVE_LORAX = "The lorax output of Train LoRA-X."
TIP_SAVE_FILE = (
    "File name inside <loras>/lorax/. The standard LoRA, when asked for, is saved as <name>_lora. "
    "An existing file is never replaced: a counter is added instead."
)
TIP_SAVE_STANDARD = (
    "Also save the same ΔW as a standard LoRA (up = U_R·diag(ΔΣ), down = V_Rᵀ) that any LoRA loader reads, "
    "without the source model."
)
TIP_SAVE_STANDARD_RANK = (
    "Rank of the standard LoRA: 0 keeps R (exact); a smaller rank keeps the largest directions of each layer "
    "(best approximation) and the report states the error."
)


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


class LoraXSaveLoRAX(io.ComfyNode):
    """Writes the compact LoRA-X file and, on request, the equivalent standard LoRA."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraXSaveLoRAX",
            display_name=SAVE_NAME,
            category=CATEGORY,
            description=(
                "Saves a trained LoRA-X adapter into <loras>/lorax/: the compact LoRA-X file (ΔΣ per layer, with a "
                "record of the source model's bases that Transfer LoRA checks) and, if asked, the same ΔW as a "
                "standard LoRA every loader reads. Existing files are never replaced."
            ),
            inputs=[
                io.LoraModel.Input("lorax", tooltip=TIP_SAVE_LORAX),
                io.String.Input("file_name", default="lorax_trained", tooltip=TIP_SAVE_FILE),
                io.Boolean.Input("standard_lora", default=False, tooltip=TIP_SAVE_STANDARD),
                io.Int.Input("standard_rank", default=0, min=0, max=4096, tooltip=TIP_SAVE_STANDARD_RANK),
            ],
            outputs=[
                io.String.Output(display_name="lorax_name", tooltip="The LoRA-X file's name as LoRA lists show it."),
                io.String.Output(display_name="lora_name", tooltip="The standard LoRA's name (empty when not saved)."),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, file_name: str) -> bool | str:
        checked = check_file_name(file_name)
        return checked if checked is True else f"{SAVE_NAME}: {checked}"

    @classmethod
    def execute(cls, lorax, file_name: str, standard_lora: bool = False, standard_rank: int = 0) -> io.NodeOutput:
        with node_errors(SAVE_NAME):
            if not isinstance(lorax, _train_host.LoraXAdapter):
                raise FormatError(
                    f"lorax is a plain LORA_MODEL ({len(lorax)} tensors), not a LoRA-X adapter with its source "
                    "record; connect the lorax output of Train LoRA-X (Save Transferred LoRA saves other LoRAs)."
                )
            stem = file_name.strip().removesuffix(".safetensors")
            layers = {key.removesuffix(".weight"): f for key, f in lorax.factors.items()}
            path = _save(stem, layers, lorax.metadata)
            lines = [f"saved LoRA-X {_host.loras_relative_name(path)} ({len(layers)} layers)"]
            standard_name = ""
            if standard_lora:
                export = compress_standard(lorax.standard, int(standard_rank) or None)
                meta = {
                    **lorax.metadata,
                    "lorax.origin": f"{SAVE_NAME} (standard LoRA of a LoRA-X adapter)",
                    "lorax.export_rank": str(export.rank or "R"),
                    "lorax.export_error": f"{export.max_error:.6g}",
                }
                std = _save(f"{stem}_lora", {key.removesuffix(".weight"): f for key, f in export.layers.items()}, meta)
                standard_name = _host.loras_relative_name(std)
                lines.append(f"saved {standard_name}: {export.summary()}")
        text = "\n".join(lines)
        return io.NodeOutput(_host.loras_relative_name(path), standard_name, ui=ui.PreviewText(text))


def _save(stem: str, layers: Mapping[str, AdapterLayer], metadata: Mapping[str, str]) -> Path:
    """Write under ``<loras>/lorax/`` in ComfyUI-native style, adding a counter instead of overwriting."""
    return _host.write_numbered(stem, lambda path: write_lora(path, layers, style="comfy", metadata=metadata))
