"""LoRA-X for ComfyUI: training-free LoRA transfer between base models (nodes in ``nodes/``)."""

from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
