"""UI-facing helpers shared by the nodes: widget values → core options, results → text, errors.

Nothing here imports ComfyUI; the tooltips are module constants so docs/NODES.md can quote
them verbatim (a test keeps the two in sync).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..lorax_core.errors import LoraxError, with_context
from ..lorax_core.formats import LoraFile
from ..lorax_core.pipeline import ModelInfo, output_metadata
from ..lorax_core.types import METHODS, TransferOptions, TransferReport, TransferResult

if TYPE_CHECKING:
    from ._host import SourceModel

CATEGORY = "LoRA-X"
NO_LORA = "(none)"

TIP_SOURCE = (
    "The base model the LoRA was trained on (a .safetensors checkpoint or diffusion-model file). "
    "Only the weights a transfer needs are read; nothing is loaded into memory up front."
)
TIP_SOURCE_FILE = "Checkpoint or diffusion-model file (from the checkpoints and diffusion_models folders) the LoRA was trained on."
TIP_TARGET = "The model to move the LoRA onto (e.g. a fine-tune of the source). Not modified."
TIP_TARGET_CLIP = (
    "Optional: the target's CLIP. Connect it to also transfer the LoRA's text-encoder layers "
    "(their source weights come from the source checkpoint); otherwise they are skipped and listed in the report."
)
TIP_LORA_NAME = "LoRA file (from the loras folder) trained on the source model. Ignored when a LORA_MODEL is connected."
TIP_LORA_MODEL = "Optional: a LoRA from another node (LORA_MODEL). Takes precedence over lora_name."
TIP_SIM_LORA = "Optional LoRA file: compare only the layers it patches. (none) compares every layer a LoRA could patch."
TIP_METHOD = (
    "auto: the documented default rule. lorax: LoRA-X projection (for LoRA-X adapters). prolora: ProLoRA "
    "subspace + complement split. exact: keeps every block (unchanged when target = source). project: plain "
    "projection onto the target's subspaces. copy: unchanged factors (what loading the LoRA directly does)."
)
TIP_RANK = "R: how many top singular directions of each base weight define its subspace (paper: 320). Clipped per layer."
TIP_THRESHOLD = (
    "c: how far from chance level (0) towards identical subspaces (1) a layer's similarity must be "
    "to be transferred. Layers below it are skipped and listed in the report."
)
TIP_USE_CACHE = (
    "Reuse base-weight decompositions (SVDs) saved on disk under ComfyUI's user folder "
    "(user/__lorax/subspace-cache), so repeat runs on the same models skip them. "
    "Turn off to recompute everything and store nothing."
)
TIP_SIMILARITY = "Optional: a similarity result from Compute Subspace Similarity, reused instead of recomputed."
TIP_MODEL = "The model to patch (not modified; a patched copy is returned)."
TIP_CLIP = "Optional CLIP to patch with the LoRA's text-encoder layers."
TIP_LORA = "The LoRA to apply, e.g. from Transfer LoRA."
TIP_STRENGTH_MODEL = "How strongly the LoRA changes the diffusion model (1.0 = as trained)."
TIP_STRENGTH_CLIP = "How strongly the LoRA changes the text encoder (1.0 = as trained)."
TIP_FILE_NAME = (
    "File name inside <loras>/lorax/. An existing file is never replaced: a counter is added instead. "
    "The stock Load LoRA node lists the file after a refresh (R)."
)

METHOD_CHOICES: tuple[str, ...] = METHODS

TIP_REFINE_SOURCE_MODEL = (
    "The base model the LoRA was trained on, loaded as a MODEL (e.g. Load Checkpoint). "
    "With the source LoRA it is the teacher. Not modified."
)
TIP_REFINE_TARGET_MODEL = "The model the LoRA was transferred onto (Transfer LoRA's target). Not modified."
TIP_TRANSFERRED = (
    "The LoRA from Transfer LoRA: its diffusion-model factors are the starting point and are optimised; "
    "text-encoder layers are kept as they are."
)
TIP_POSITIVE = (
    "Your prompts (CLIP Text Encode). Each entry of a combined conditioning (Conditioning (Combine)) "
    "is a prompt of its own for the generations and the probes."
)
TIP_LATENT = (
    "Size and batch size of the generations (e.g. Empty Latent Image): half are sampled by the source with "
    "its LoRA, half by the target with the transferred LoRA. A batch of 4 to 8 gives the probes variety."
)
TIP_REFINE_LORA_NAME = (
    "The LoRA file the transfer started from (trained on source_model). Ignored when a LORA_MODEL is connected."
)
TIP_REFINE_LORA_MODEL = "Optional: the source LoRA as a LORA_MODEL. Takes precedence over lora_name."
TIP_OBJECTIVE = (
    "effect: the LoRA should change the target as it changes the source (keeps the target's look). "
    "output: the target with the LoRA should reproduce the source with the LoRA (can erase the target's character). "
    "blend: in between, set by output_weight."
)
TIP_OUTPUT_WEIGHT = (
    "blend only: the share of output matching (0 = effect, 1 = output); the target keeps 1 − output_weight "
    "of what it does differently from the source."
)
TIP_REFINE_STEPS = (
    "Optimisation steps: each is one forward and backward pass of the target on a batch of probes. "
    "0 returns the transferred LoRA with its held-out loss."
)
TIP_LEARNING_RATE = "Adam learning rate of the LoRA factors (short warm-up, then cosine decay to 0)."
TIP_PROBES = (
    "How many synthetic inputs (the generations re-noised at random timesteps) to distil on; "
    "one in eight is held out to check the result."
)
TIP_SAMPLE_STEPS = (
    "Sampling steps of each generation (euler, simple scheduler). The generations only need to look like "
    "the models' outputs, not be finished images."
)
TIP_CFG = "Guidance scale of the generations; the negative prompt is neutral, or the prompt zeroed out without it."
TIP_REFINE_SEED = (
    "Seeds the generations, the probes, the held-out split and the batch order: "
    "the same inputs and seed give the same LoRA."
)
TIP_BATCH = "Probes per step and per teacher pass. Lower it if the GPU runs out of memory."
TIP_NEUTRAL = (
    "Optional: the conditioning of an empty prompt (CLIP Text Encode without text). A quarter of the probes "
    "use it, so the LoRA's effect is learnt for the unconditional branch of guidance too."
)


def transfer_options(method: str, rank: int, threshold: float, device: str) -> TransferOptions:
    """The core's options from the node's widgets (validated by :class:`TransferOptions`)."""
    return TransferOptions(method=method, rank=int(rank), threshold=float(threshold), device=device)


def report_text(report: TransferReport, header: str) -> str:
    """The text shown on the node and returned on the ``report`` output."""
    return f"{header}\n{report.summary()}"


def provenance(lora: LoraFile, result: TransferResult, options: TransferOptions, source: SourceModel,
               target_family: str, target_fingerprint: str, lora_name: str) -> dict[str, str]:
    """String metadata written with a saved LoRA: the core's one builder
    (:func:`lorax_core.pipeline.output_metadata`), so the node and the CLI write the same keys and
    keep the source LoRA's own metadata (trigger words, base model version)."""
    return output_metadata(
        lora,
        options,
        lora_name=lora_name,
        source=ModelInfo(name=source.name, fingerprint=source.weights.fingerprint, family=str(source.family or "")),
        target=ModelInfo(name=f"the connected MODEL ({target_family})", fingerprint=target_fingerprint,
                         family=target_family),
        report=result.report,
        host="ComfyUI node pack",
    )


@contextmanager
def node_errors(display_name: str) -> Iterator[None]:
    """Re-raise the core's errors with the node's display name in front, without a traceback chain."""
    try:
        yield
    except LoraxError as exc:
        raise with_context(exc, display_name) from None


def check_file_name(name: str) -> bool | str:
    """``validate_inputs`` check for the save node's file name: a plain name, no folders."""
    stripped = name.strip()
    if not stripped:
        return "file_name is empty; type a name such as my_lora_transferred."
    if "/" in stripped or "\\" in stripped or stripped in (".", "..") or stripped.startswith("."):
        return f"file_name {name!r} must be a plain file name (no folders, not starting with '.')."
    return True
