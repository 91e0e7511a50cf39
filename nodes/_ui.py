"""UI-facing helpers shared by the nodes: widget values → core options, results → text and the
report view's data, errors.

Nothing here imports ComfyUI; the tooltips are module constants so docs/NODES.md can quote
them verbatim (a test keeps the two in sync).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..lorax_core.errors import LoraxError, with_context
from ..lorax_core.pipeline import ModelInfo
from ..lorax_core.similarity import SimilarityTable
from ..lorax_core.types import METHODS, LayerReport, SkipReason, TransferOptions, TransferReport

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
TIP_LORA_FOLDER = (
    "The folder of LoRAs to move (a sub-folder of loras, walked with its sub-folders, or all of them). "
    "Every LoRA in it is transferred; files that cannot be (another model family, unsupported adapter types, damaged, pickles) "
    "are listed in the summary with the reason."
)
TIP_TARGET_NAME = (
    "Name of the output folder <loras>/lorax/<name>/ (e.g. the target model's name). Empty: the target's "
    "family and fingerprint. Results keep their relative paths and names; re-running skips finished files."
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
    "Size and batch size of the generations (e.g. Empty Latent Image), sampled by the source with its LoRA: "
    "they show what the LoRA draws. A batch of 4 to 8 gives the probes variety."
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
    "How many synthetic inputs (the generations re-noised at random timesteps) to distil on, each also run under "
    "the neutral prompt; one in eight is held out to check the result."
)
TIP_SAMPLE_STEPS = (
    "Sampling steps of each generation (euler, simple scheduler). The generations only need to look like "
    "the models' outputs, not be finished images."
)
TIP_CFG = "Guidance scale of the generations; the negative prompt is neutral, or the prompt zeroed out without it."
TIP_REFINE_SEED = (
    "Seeds the generations, the probes, the held-out split and the batch order: "
    "the same inputs and seed give the same LoRA. Another seed can land a stronger or weaker effect; "
    "if it comes out weak, try one."
)
TIP_BATCH = (
    "Probes per step (each runs with its neutral twin, so a step runs the model on twice as many) and per "
    "teacher pass. Lower it if the GPU runs out of memory."
)
TIP_NEUTRAL = (
    "Optional: the conditioning of an empty prompt (CLIP Text Encode without text). Every probe is also run "
    "under it, so the LoRA's effect is learnt for the unconditional branch of guidance too and keep_guidance can "
    "hold the target's guidance direction. Without it, the first prompt zeroed out plays the neutral prompt."
)
TIP_KEEP_GUIDANCE = (
    "Weight of the term that keeps the target's own guidance direction (prompt minus neutral prediction), "
    "which carries what the prompt asks for: it stops the LoRA from trading the prompt's content for style. "
    "0 turns it off; large values (≥ 2) also hold back the style."
)


def transfer_options(method: str, rank: int, threshold: float, device: str) -> TransferOptions:
    """The core's options from the node's widgets (validated by :class:`TransferOptions`)."""
    return TransferOptions(method=method, rank=int(rank), threshold=float(threshold), device=device)


def report_text(report: TransferReport, header: str) -> str:
    """The text shown on the node and returned on the ``report`` output."""
    return f"{header}\n{report.summary()}"


# --------------------------------------------------------------------------- the report view (web/js/lorax.js)

#: The ``ui`` key the report view reads (one JSON-safe dict per run, :func:`transfer_view` / :func:`similarity_view`).
VIEW_KEY = "lorax_view"
VIEW_VERSION = 1
#: Columns of one row of ``layers`` in a view (rows are lists, not dicts: a 700-layer SDXL report
#: stays near 100 kB in the page and in the saved workflow).
VIEW_COLUMNS = ("name", "section", "block", "outcome", "phi", "phi_left", "phi_right", "chance", "threshold",
                "energy_kept", "output_rank", "reason", "model_key")
#: Short words for the one-line verdict, per skip reason (the full phrase is in the hover and the text).
#: Skips decided while planning (unresolved, host_rule) say what kind with their reason's first clause.
SKIP_LABELS: dict[SkipReason, str] = {
    SkipReason.UNSUPPORTED: "not transferable",
    SkipReason.HOST_RULE: "left out",
    SkipReason.NO_SOURCE: "not in the source model",
    SkipReason.SOURCE_SHAPE: "LoRA does not fit the source",
    SkipReason.UNRESOLVED: "unresolved",
    SkipReason.NO_PARTNER: "no partner layer",
    SkipReason.WIDTH: "width mismatch",
    SkipReason.LORAX_RANK: "LoRA-X rank too large",
    SkipReason.ZERO: "zero update",
    SkipReason.PROJECTED_ZERO: "projects to zero",
    SkipReason.BELOW: "below threshold",
    SkipReason.WEIGHT_NDIM: "not a linear/conv weight",
    SkipReason.NONFINITE_WEIGHT: "damaged base weight",
    SkipReason.OVERFLOW: "overflow",
    SkipReason.MALFORMED: "malformed layer",
}
# Where a layer sits in the model, from its model key or its LoRA name (kohya ``_``, diffusers ``.``):
# ``(section, pattern whose first group is the block number)``, first match wins. UNet block
# names come before the DiT ones because SD's attention lives in ``…transformer_blocks.0…`` too.
_PLACES: tuple[tuple[str, re.Pattern[str]], ...] = tuple((section, re.compile(pattern)) for section, pattern in (
    ("text encoder 2", r"(?:clip_g|lora_te2|text_encoder_2)[._](?:.*?layers?[._](\d+))?"),
    ("text encoder", r"(?:text_encoders|lora_te1?|text_encoder)[._](?:.*?layers?[._](\d+))?"),
    ("input", r"(?:input[._]blocks|down[._]blocks)[._](\d+)"),
    ("middle", r"(?:middle[._]block|mid[._]block)()"),
    ("output", r"(?:output[._]blocks|up[._]blocks)[._](\d+)"),
    ("double", r"double[._]blocks[._](\d+)"),
    ("single", r"single[._](?:transformer[._])?blocks[._](\d+)"),
    ("joint", r"joint[._]blocks[._](\d+)"),
    ("double", r"transformer[._]blocks[._](\d+)"),
    ("blocks", r"(?:^|[._])blocks[._](\d+)"),
))


def layer_place(name: str) -> tuple[str, int]:
    """``(section, block number)`` of a layer, the way the model is built: text encoders, then the UNet's
    ``input``/``middle``/``output`` blocks or a DiT's ``double``/``single``/``joint`` blocks.

    ``name`` is a model key (``diffusion_model.input_blocks.4.1.….weight``, ``text_encoders.clip_l.…``)
    or a LoRA layer name (``lora_unet_input_blocks_4_1_…``, ``lora_te2_…``, ``transformer.single_transformer_blocks.3…``).
    Unknown layouts fall into section ``other``, block ``-1``.
    """
    for section, pattern in _PLACES:
        match = pattern.search(name)
        if match:
            block = match.group(1) if match.groups() else None
            return section, int(block) if block else -1
    return "other", -1


def _finite(value: float | None, digits: int = 4) -> float | None:
    return round(value, digits) if value is not None and math.isfinite(value) else None


def _phi(left: float | None, right: float | None) -> float | None:
    values = [v for v in (left, right) if v is not None and math.isfinite(v)]
    return min(values) if values else None


def skip_label(code: str, reason: str) -> str:
    """A skip reason in a few words (the verdict's vocabulary): :data:`SKIP_LABELS`, or the reason's first clause."""
    try:
        label = SKIP_LABELS.get(SkipReason(code), "")
    except ValueError:
        label = ""
    if (not label or code in (SkipReason.UNRESOLVED.value, SkipReason.HOST_RULE.value)) and reason:
        label = re.split(r"[:;(]", reason, maxsplit=1)[0].strip()[:48] or label
    return label or SKIP_LABELS[SkipReason.UNRESOLVED]


def _verdict(parts: Sequence[str], phis: Sequence[float]) -> str:
    mean = f"mean Φ {sum(phis) / len(phis):.2f}" if phis else "no Φ measured"
    return " · ".join([*parts, mean])


def _reason_counts(labels: Sequence[str]) -> str:
    counts = Counter(labels).most_common()
    return ", ".join(f"{n} {label}" if len(counts) > 1 else label for label, n in counts)


def transfer_view(report: TransferReport, title: str) -> dict[str, Any]:
    """The Transfer LoRA node's report view: a one-line verdict and one row per layer, skipped layers first.

    Row columns are :data:`VIEW_COLUMNS`; ``outcome`` is the method for a transferred layer and
    ``skip:<code>`` (``transfer.SkipReason``) for a skipped one; Φ = min(Φ_left, Φ_right) (LoRA-X,
    arXiv 2501.16559, Eq. 4). Every float is finite or ``None`` (strict JSON).
    """
    rows, labels, phis = [], {}, []
    for r in sorted(report.layers, key=lambda r: r.status != "skipped"):
        phi = _phi(r.phi_left, r.phi_right)
        if phi is not None and r.status == "transferred":
            phis.append(phi)
        if r.status == "skipped":
            code = str(r.code or SkipReason.UNRESOLVED)
            outcome = f"skip:{code}"
            labels[outcome] = skip_label(code, r.reason)
        else:
            outcome = r.method
        rows.append(_row(r.key, r.target_key or r.source_key, outcome, phi, r, r.reason))
    skipped = [labels[row[3]] for row in rows if str(row[3]).startswith("skip:")]
    parts = [f"{len(rows) - len(skipped)} of {len(rows)} layers transferred"]
    if skipped:
        parts.append(f"{len(skipped)} skipped: {_reason_counts(skipped)}")
    return {"v": VIEW_VERSION, "kind": "transfer", "title": title, "verdict": _verdict(parts, phis),
            "columns": list(VIEW_COLUMNS), "labels": labels, "layers": rows}


def _row(name: str, model_key: str | None, outcome: str, phi: float | None, r: LayerReport | None,
         reason: str) -> list[Any]:
    section, block = layer_place(model_key or name)
    numbers = (r.phi_left, r.phi_right, r.chance, r.threshold, r.energy_kept) if r is not None else (None,) * 5
    return [name, section, block, outcome, _finite(phi), *(_finite(v) for v in numbers),
            None if r is None else r.output_rank, reason, model_key]


def similarity_view(table: SimilarityTable, title: str) -> dict[str, Any]:
    """The similarity node's view, in :func:`transfer_view`'s layout: outcome ``pass``/``fail``/``n/a``
    (not compared, e.g. the widths differ), failing and not-compared pairs first."""
    rows, phis = [], []
    for e in sorted(table.entries, key=lambda e: e.passed):
        phi = _phi(e.phi_left, e.phi_right) if e.phi is not None else None
        if phi is not None:
            phis.append(phi)
        outcome = "pass" if e.passed else ("fail" if phi is not None else "n/a")
        section, block = layer_place(e.source_key)
        target = "" if e.target_key == e.source_key else f" → {e.target_key}"
        rows.append([e.source_key + target, section, block, outcome, _finite(phi), _finite(e.phi_left),
                     _finite(e.phi_right), _finite(e.chance), _finite(e.threshold), None, e.rank, e.reason,
                     e.target_key])
    failed = sum(row[3] == "fail" for row in rows)
    missing = sum(row[3] == "n/a" for row in rows)
    parts = [f"{len(rows) - failed - missing} of {len(rows)} layer pairs pass"]
    if failed:
        parts.append(f"{failed} below threshold")
    if missing:
        parts.append(f"{missing} not compared")
    return {"v": VIEW_VERSION, "kind": "similarity", "title": title, "verdict": _verdict(parts, phis),
            "columns": list(VIEW_COLUMNS), "labels": {"pass": "passes", "fail": "below threshold",
                                                      "n/a": "not compared"}, "layers": rows}


def report_ui(text: str, view: dict[str, Any] | None = None) -> dict[str, list[Any]]:
    """A node's ``ui`` payload: the report text (``text``, what the stock frontend and the history show)
    and, when given, the structured view the pack's web extension draws (:data:`VIEW_KEY`)."""
    out: dict[str, list[Any]] = {"text": [text]}
    if view is not None:
        out[VIEW_KEY] = [view]
    return out


def model_infos(source: SourceModel, target_family: str, target_fingerprint: str) -> tuple[ModelInfo, ModelInfo]:
    """How provenance metadata (:func:`lorax_core.pipeline.output_metadata`) names the source file and
    the connected target ``MODEL``, so the node and the CLI write the same keys."""
    return (
        ModelInfo(name=source.name, fingerprint=source.weights.fingerprint, family=str(source.family or "")),
        ModelInfo(name=f"the connected MODEL ({target_family})", fingerprint=target_fingerprint, family=target_family),
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
