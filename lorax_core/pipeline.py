"""The transfer pipeline's host-independent steps, shared by the command line and the ComfyUI nodes.

A front end (``lorax_core.cli``, ``nodes/transfer.py``) only adapts its inputs — files or
ComfyUI objects, a key map, progress, cancel, cache location — and presents the result:

:func:`run_transfer` runs the whole job — every step below in order — and is the one call every
front end and benchmark makes, so a new step is added in one place:

1. :func:`plan_transfer` — resolve the LoRA's layer names to source model keys (with the host's
   key map when it has one), check every layer's shape against its source weight; no weight is
   read. Every layer ends up either planned or in ``skipped`` with its reason.
   :func:`check_source_bases` refuses a LoRA-X file on a source whose bases differ from its own.
2. :func:`lorax_core.transfer.transfer_adapter` — gather, decompose, transfer, report.
3. :func:`output_names` — name every transferred layer in the source LoRA's key style.
4. :func:`output_metadata` — one metadata builder: the source LoRA's own metadata (trigger words,
   training tags, base model version) minus what describes the source file itself, plus the
   ``lorax.*`` provenance keys, the same key set whichever front end wrote the file.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from .errors import NothingTransferableError, ShapeMismatchError
from .formats import LoraFile
from .formats.family import guess_family
from .formats.resolve import KeyMap, layer_name_for, resolve_layers
from .slices import parse_slice_key
from .types import (
    AdapterLayer,
    LoraFactors,
    Skip,
    SkipReason,
    TransferOptions,
    TransferReport,
    TransferResult,
    WeightSource,
    shape_problem,
)
from .version import TOOL_VERSION

if TYPE_CHECKING:
    from .cache import SubspaceCache
    from .modelio import FileWeights
    from .similarity import SimilarityTable
    from .subspaces import SubspaceProvider

__all__ = [
    "ModelInfo",
    "TransferJob",
    "TransferPlan",
    "check_source_bases",
    "file_model_info",
    "output_metadata",
    "output_names",
    "plan_transfer",
    "run_transfer",
]

#: Source LoRA metadata that describes the source file itself and would be wrong for the output
#: (its network dim/alpha, its hashes).
STALE_METADATA = ("ss_network_dim", "ss_network_alpha", "sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")


@dataclass
class TransferPlan:
    """What :func:`~lorax_core.transfer.transfer_adapter` needs besides the weights and the options.

    Attributes:
        layers: ``{source model key: adapter layer}`` for every layer that resolved and fits.
        names: ``{source model key: the LoRA's own layer name}``.
        skipped: ``{layer name: Skip}`` for every other layer, coded by what left it out:
            ``unsupported`` (adapter types and keys no handler reads), ``unresolved`` (no model
            weight of that name), ``source_shape`` (does not fit the source weight) and
            ``host_rule`` (a front end's own rule, such as a text-encoder layer without a CLIP).
    """

    layers: dict[str, AdapterLayer]
    names: dict[str, str]
    skipped: dict[str, Skip]


@dataclass(frozen=True)
class ModelInfo:
    """How a base model is named in provenance metadata.

    Attributes:
        name: the file name (CLI) or the name the host lists it under (ComfyUI).
        fingerprint: :attr:`~lorax_core.types.WeightSource.fingerprint`.
        family: the detected family (``SD15``, ``SDXL``…) or ``""`` when unknown.
    """

    name: str
    fingerprint: str
    family: str = ""


def file_model_info(weights: FileWeights) -> ModelInfo:
    """A model file as provenance metadata names it (file name, fingerprint, guessed family)."""
    family = guess_family(weights.file_shapes, weights.metadata) or ""
    return ModelInfo(name=weights.path.name, fingerprint=weights.fingerprint, family=family)


def plan_transfer(
    lora: LoraFile,
    source: WeightSource,
    key_map: KeyMap | None = None,
    *,
    source_name: str = "the source model",
    host_rule: Callable[[str, str | None], str] | None = None,
) -> TransferPlan:
    """Resolve a LoRA's layers to source model keys and check their shapes (step 1; no weight read).

    Args:
        lora: the LoRA as read by :mod:`lorax_core.formats`.
        source: the source base model (only ``keys()`` and ``shape()`` are used).
        key_map: the host's LoRA key map (ComfyUI's), tried first; see
            :func:`~lorax_core.formats.resolve.resolve_layers`.
        source_name: how error messages name the source model (its file, or its ComfyUI name).
        host_rule: ``host_rule(layer name, model key or None)`` → a skip reason or ``""``: a
            front end's own rule (the nodes skip text-encoder layers when no target CLIP is
            connected). ``None`` for unresolved layers, whose resolver reason it may replace.

    Returns:
        The plan; every layer of the file is in ``layers`` or ``skipped``.

    Raises:
        NothingTransferableError: the file has no transferable layer at all.
        ShapeMismatchError: every resolved layer's shape differs from its source weight (the
            LoRA belongs to another base model).
    """
    # A reader's reason may carry its own code (types.SkipText: a damaged layer is malformed_layer).
    skipped = {
        name: Skip(getattr(reason, "code", SkipReason.UNSUPPORTED), str(reason))
        for name, reason in lora.unsupported.items()
    }
    where = lora.path or "the LoRA"
    if not lora.layers:
        raise NothingTransferableError(
            f"{where}: none of its {len(skipped)} layers is a transferable LoRA layer ({reason_counts(skipped.values())})."
        )
    resolved, unresolved = resolve_layers(lora.layers, source.keys(), key_map)
    for name, reason in unresolved.items():
        rule = host_rule(name, None) if host_rule else ""
        skipped[name] = Skip(SkipReason.HOST_RULE, rule) if rule else Skip(SkipReason.UNRESOLVED, reason)
    layers: dict[str, AdapterLayer] = {}
    names: dict[str, str] = {}
    mismatches: list[str] = []
    for name, key in resolved.items():
        layer = lora.layers[name]
        problem = shape_problem(layer, tuple(source.shape(key)))
        piece = parse_slice_key(key)
        if problem and piece is not None:
            # Inside ComfyUI the key map comes from the *target* model: a target of another size
            # of the family (SD3.5 Medium for a Large LoRA) cuts the fused weight at other rows.
            problem += (
                f" (rows {piece.offset}–{piece.offset + piece.size - 1} of the fused weight {piece.base}, "
                "where the key map slices it; a target model of another size of this family slices it elsewhere)"
            )
        if problem:
            skipped[name] = Skip(SkipReason.SOURCE_SHAPE, problem)
            mismatches.append(f"{name}: {problem}")
            continue
        rule = host_rule(name, key) if host_rule else ""
        if rule:
            skipped[name] = Skip(SkipReason.HOST_RULE, rule)
            continue
        layers[key], names[key] = layer, name
    if not layers:
        if mismatches and len(mismatches) == len(resolved):
            raise ShapeMismatchError(
                f"{where}: no layer fits {source_name} ({len(mismatches)} shape mismatches, e.g. {mismatches[0]}). "
                "Is this LoRA for another base model family? Use the model it was trained on as the source model."
            )
        raise NothingTransferableError(
            f"{where}: none of its {len(lora.layers) + len(lora.unsupported)} layers could be used with "
            f"{source_name} ({reason_counts(skipped.values())})."
        )
    return TransferPlan(layers=layers, names=names, skipped=skipped)


def check_source_bases(lora: LoraFile, plan: TransferPlan, source: WeightSource, cache: object, device: str) -> str:
    """Refuse a source whose singular bases differ from those a LoRA-X file was trained in (step 1b).

    A LoRA-X layer is a core in its training model's bases; on another source it means nothing.
    Delegates to :func:`lorax_core.lorax_export.check_lorax_source` with the transfer's cache, so
    the subspaces it computes are reused by the transfer.

    Returns:
        One line for the report ("" for an adapter without LoRA-X layers).

    Raises:
        IncompatibleBaseError: the bases differ (the message names the layer and the fingerprints).
        FormatError: the file's basis record is damaged.
    """
    from .lorax_export import check_lorax_source
    from .subspaces import SubspaceProvider

    return check_lorax_source(lora.metadata, plan.layers, source, SubspaceProvider(cache, device))


def output_names(result: TransferResult, plan: TransferPlan, lora_format: str, style: str = "source") -> dict[str, str]:
    """``{target model key: output layer name}`` for every transferred layer (step 3).

    In ``source`` style a layer keeps the name the source file used, when the target key is the
    source key it came from (name pairing); a layer paired by similarity with another target
    key, or one the source file did not name, gets a kohya or ComfyUI-native name for its
    *target* key (:func:`~lorax_core.formats.resolve.layer_name_for`). ``comfy`` style names
    every layer the ComfyUI-native way, except slices of fused weights (:mod:`lorax_core.slices`),
    which keep the LoRA's own name in every style.
    """
    by_target = {r.target_key: r.source_key for r in result.report.layers if r.target_key is not None}
    out: dict[str, str] = {}
    for key in result.layers:
        same = by_target.get(key, key) == key and key in plan.names
        if same and parse_slice_key(key) is not None:
            # A slice of a fused weight has no name of its own in any style: only the LoRA's
            # name (``…attn.to_q``) tells a loader which rows of ``…qkv.weight`` it patches.
            out[key] = plan.names[key]
        elif style == "comfy":
            out[key] = layer_name_for(key, "comfy")
        else:
            out[key] = plan.names[key] if same else layer_name_for(key, lora_format)
    return out


def output_metadata(
    lora: LoraFile,
    options: TransferOptions,
    *,
    lora_name: str,
    source: ModelInfo,
    target: ModelInfo,
    report: TransferReport,
    host: str,
) -> dict[str, str]:
    """String metadata for a transferred LoRA (step 4): the source's own metadata plus provenance.

    The source LoRA's metadata is kept (trigger words, training tags, base model version)
    except fields that describe the source file itself (:data:`STALE_METADATA`) and earlier
    ``lorax.*`` provenance. The ``lorax.*`` keys are the same whichever front end calls this.

    Args:
        lora_name: how the user named the LoRA (its file name, or the ComfyUI input it came from).
        host: the front end, e.g. ``"command line"`` or ``"ComfyUI node pack"``.
    """
    meta = {k: v for k, v in lora.metadata.items() if k not in STALE_METADATA and not k.startswith("lorax.")}
    totals = report.totals()
    meta.update(
        {
            "lorax.method": options.method,
            "lorax.rank": str(options.rank),
            "lorax.threshold": str(options.threshold),
            "lorax.output_rank": "" if options.output_rank is None else str(options.output_rank),
            "lorax.source_lora": lora_name,
            "lorax.source_format": lora.format,
            "lorax.source_model": source.name,
            "lorax.source_family": source.family,
            "lorax.source_fingerprint": source.fingerprint,
            "lorax.target_model": target.name,
            "lorax.target_family": target.family,
            "lorax.target_fingerprint": target.fingerprint,
            "lorax.transferred": str(totals["transferred"]),
            "lorax.skipped": str(totals["skipped"]),
            "lorax.report": report.to_json(indent=None),
            "lorax.host": f"{host} {TOOL_VERSION}",
            "lorax.tool_version": TOOL_VERSION,
        }
    )
    return meta


def reason_counts(reasons: Iterable[Skip | str]) -> str:
    """``"3× reason a; 1× reason b"`` — the three most common reasons, for one-line messages."""
    counts = Counter(str(reason) for reason in reasons)
    parts = [f"{n}× {reason}" for reason, n in counts.most_common(3)]
    if len(counts) > 3:
        parts.append(f"{len(counts) - 3} other reasons")
    return "; ".join(parts) or "no layers"


@dataclass
class TransferJob:
    """Everything one transfer produced (:func:`run_transfer`), ready for a front end to write or wrap.

    Attributes:
        plan: the plan of step 1 (its ``names`` are the LoRA's own layer names).
        result: the core's result; ``result.layers`` is keyed by *target* model key.
        names: ``{target model key: output layer name}`` in the requested style (step 3).
        metadata: the output file's string metadata (step 4).
        bases_note: the LoRA-X base check's line for the report ("" for a standard LoRA).
        seconds: wall seconds per step (``plan``, ``check_bases``, ``transfer``, ``finish``), for
            progress summaries and benchmarks.
    """

    plan: TransferPlan
    result: TransferResult
    names: dict[str, str]
    metadata: dict[str, str]
    bases_note: str = ""
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def out_layers(self) -> dict[str, LoraFactors]:
        """``{output layer name: LoraFactors}``, what :func:`lorax_core.formats.write_lora` takes."""
        return {self.names[key]: factors for key, factors in self.result.layers.items()}


def run_transfer(
    lora: LoraFile,
    source: WeightSource,
    target: WeightSource,
    options: TransferOptions,
    *,
    lora_name: str,
    source_info: ModelInfo,
    target_info: ModelInfo,
    host: str,
    key_map: KeyMap | None = None,
    source_name: str = "the source model",
    host_rule: Callable[[str, str | None], str] | None = None,
    style: Literal["source", "comfy"] = "source",
    cache: SubspaceCache | None = None,
    similarity: SimilarityTable | None = None,
    progress: Callable[[int, int], None] | None = None,
    provider: SubspaceProvider | None = None,
) -> TransferJob:
    """One LoRA transfer, every step in order: the single entry point of every front end.

    Steps: :func:`plan_transfer` → slices of fused weights registered on the target (a target
    with ``add_slices``, i.e. a file; a host model lists its slices itself) → the LoRA-X base
    check (:func:`check_source_bases`) → :func:`lorax_core.transfer.transfer_adapter` (gather,
    decompose, transfer; LoRA-X, arXiv 2501.16559 §3; ProLoRA, arXiv 2506.04244 §3) →
    :func:`output_names` → :func:`output_metadata`. Nothing is written: the front end writes
    (CLI, folder migration) or wraps (ComfyUI) the returned job.

    Args:
        lora: the LoRA as read by :mod:`lorax_core.formats`.
        source, target: the base models (read one weight at a time; float32 upcast by the core,
            on ``options.device``; the result's factors are on CPU in the LoRA's dtype).
        options: see :class:`~lorax_core.types.TransferOptions`.
        lora_name, source_info, target_info, host: provenance, see :func:`output_metadata`.
        key_map, source_name, host_rule: see :func:`plan_transfer`.
        style: output key style, see :func:`output_names`.
        cache, similarity, progress, provider: see :func:`lorax_core.transfer.transfer_adapter`;
            the base check uses the same cache, so the subspaces it computes are reused.

    Returns:
        The :class:`TransferJob`.

    Raises:
        NothingTransferableError, ShapeMismatchError: see :func:`plan_transfer`.
        IncompatibleBaseError, FormatError: see :func:`check_source_bases`.
        OptionError, LayerSkippedError: see :func:`~lorax_core.transfer.transfer_adapter`.
    """
    from .transfer import transfer_adapter

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    plan = plan_transfer(lora, source, key_map, source_name=source_name, host_rule=host_rule)
    add_slices = getattr(target, "add_slices", None)
    if add_slices is not None:
        # The core pairs layers by the target's keys before reading any: slices of fused weights
        # (Flux/SD3 qkv) the plan uses must be listed by the target file too.
        add_slices(plan.layers)
    seconds["plan"], start = time.perf_counter() - start, time.perf_counter()
    bases_note = check_source_bases(lora, plan, source, cache, options.device)
    seconds["check_bases"], start = time.perf_counter() - start, time.perf_counter()
    result = transfer_adapter(
        plan.layers,
        source,
        target,
        options,
        names=plan.names,
        skipped=plan.skipped,
        similarity=similarity,
        cache=cache,
        progress=progress,
        provider=provider,
    )
    seconds["transfer"], start = time.perf_counter() - start, time.perf_counter()
    names = output_names(result, plan, lora.format, style)
    metadata = output_metadata(
        lora, options, lora_name=lora_name, source=source_info, target=target_info, report=result.report, host=host
    )
    seconds["finish"] = time.perf_counter() - start
    return TransferJob(plan=plan, result=result, names=names, metadata=metadata, bases_note=bases_note, seconds=seconds)
