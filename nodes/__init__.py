"""The pack's ComfyUI nodes (V3 schema). This module is the only place that lists them."""

from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io

from .apply import LoraXApplyTransferredLoRA
from .compare import LoraXCompareTransfer
from .load import LoraXLoadSourceModel
from .migrate import LoraXMigrateLoRAFolder
from .refine import LoraXRefineTransferredLoRA
from .save import LoraXSaveLoRAX, LoraXSaveTransferredLoRA
from .similarity import LoraXSubspaceSimilarity
from .train import LoraXTrainLoRAX
from .transfer import LoraXTransferLoRA

NODES: list[type[io.ComfyNode]] = [
    LoraXLoadSourceModel,
    LoraXSubspaceSimilarity,
    LoraXTransferLoRA,
    LoraXApplyTransferredLoRA,
    LoraXSaveTransferredLoRA,
    LoraXMigrateLoRAFolder,
    LoraXRefineTransferredLoRA,
    LoraXTrainLoRAX,
    LoraXSaveLoRAX,
    LoraXCompareTransfer,
]


class LoraXExtension(ComfyExtension):
    """Registers the LoRA-X nodes with ComfyUI."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> LoraXExtension:
    """ComfyUI's V3 entry point (awaited by the loader)."""
    return LoraXExtension()
