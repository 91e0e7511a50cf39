"""Training-free transfer of LoRA and LoRA-X layers to a new base model.

All maths is in factored form: a LoRA update ``ΔW = up @ down`` is moved by multiplying ``up``
by an ``(m, m)`` operator and ``down`` by an ``(n, n)`` operator that are themselves applied
through their top-R bases (``P(U, X) = U (Uᵀ X)``), so no ``(m, n)`` or ``(m, m)`` matrix is
ever built. Notation (ProLoRA, arXiv 2506.04244, written with factored projectors): ``P_s = U_s U_sᵀ`` and ``Q_s = I − P_s`` on the output
side, ``P'_s = V_s V_sᵀ`` and ``Q'_s`` on the input side, likewise ``P_t``… for the target.

Methods for a standard LoRA (``ΔW = scale · up @ down``; the scale is folded into ``up``):

* ``copy``    – ``ΔW`` unchanged (what stock ComfyUI does with a LoRA on another base).
* ``project`` – ``P_t ΔW P'_t`` (LoRA-X Eq. 3 applied to a LoRA; LoRA-X Table 2 baseline).
* ``prolora`` – ``P_t(P_s ΔW P'_s)P'_t + Q_t(Q_s ΔW Q'_s)Q'_t`` (ProLoRA, arXiv 2506.04244):
  subspace and complement parts, each mapped to the matching target space; rank ≤ 2r. It
  drops the cross blocks ``P_s ΔW Q'_s`` and ``Q_s ΔW P'_s``, so it does not return ΔW even
  when target = source.
* ``exact``   – all four blocks, each mapped to the matching target spaces. The four terms
  factor as ``M ΔW M'ᵀ`` with ``M = P_t P_s + Q_t Q_s`` (and ``M'`` alike), so the result has
  rank ≤ r (not 4r) and equals ΔW exactly when target = source; it is continuous in the
  target weight.
* ``align``   – for a target with one side in another basis (hidden units permuted or
  rotated): ``O ΔW`` or ``ΔW O'ᵀ`` with the orthogonal map estimated by Procrustes from the
  side that did not move (:mod:`lorax_core.align`); rank r, ΔW unchanged when target = source.

A LoRA-X layer (``ΔW = U_s core V_sᵀ``) moves by Eq. 3 of LoRA-X (arXiv 2501.16559):
``ΔW_t = U_t (U_tᵀ U_s core V_sᵀ V_t) V_tᵀ`` with truncated top-R target bases.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from .align import AlignmentTest, align_lora, align_rank, alignment_test
from .errors import (
    LayerSkippedError,
    NonFiniteError,
    NothingTransferableError,
    OptionError,
    RankError,
    ShapeMismatchError,
)
from .linalg import Subspace, factored_norm, recompress
from .lycoris import LycorisLayer, dora_magnitude, write_back
from .matching import LayerMatch, match_layers
from .quant import nonfinite_count
from .similarity import (
    LayerSimilarity,
    SimilarityTable,
    layer_similarity,
    similarity_rank,
    threshold_for,
)
from .subspaces import SubspaceProvider, prefetched_chunks
from .types import (
    METHODS,
    AdapterLayer,
    LayerReport,
    LoraFactors,
    LoraXFactors,
    Skip,
    SkipReason,
    TransferOptions,
    TransferReport,
    TransferResult,
    WeightSource,
    flat_shape,
    shape_problem,
)

if TYPE_CHECKING:
    from .cache import SubspaceCache

__all__ = [
    "LORA_METHODS",
    "choose_method",
    "lorax_to_lora",
    "transfer_adapter",
    "transfer_lora_layer",
    "transfer_lorax_layer",
]

#: Methods that apply to a standard LoRA layer.
LORA_METHODS: tuple[str, ...] = ("prolora", "exact", "project", "copy", "align")


def _P(U: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``U Uᵀ X`` for ``U`` (m, R) and ``X`` (m, r), without the (m, m) projector."""
    return U @ (U.T @ X)


def _Pr(X: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``X V Vᵀ`` for ``X`` (r, n) and ``V`` (n, R)."""
    return (X @ V) @ V.T


def _check_pair(src: Subspace, tgt: Subspace, out_features: int, in_features: int, what: str) -> None:
    if src.shape != (out_features, in_features) or tgt.shape != (out_features, in_features):
        raise ShapeMismatchError(
            f"{what} of shape {out_features}×{in_features} does not fit the subspaces "
            f"(source {src.shape[0]}×{src.shape[1]}, target {tgt.shape[0]}×{tgt.shape[1]}); "
            "compute both subspaces from the base weights this layer belongs to."
        )


def transfer_lora_layer(f: LoraFactors, src: Subspace, tgt: Subspace, method: str) -> LoraFactors:
    """Move one standard LoRA layer from the source base weight to the target one.

    Args:
        f: the layer, ``ΔW = f.scale · up @ down`` (linear or conv shapes, any dtype/device).
        src, tgt: top-R subspaces of the source and target base weights (same flattened shape);
            all their R columns are used (truncate them first for a smaller R).
        method: ``prolora``, ``exact``, ``project``, ``copy`` or ``align`` (see the module
            docstring; ``align`` (:mod:`lorax_core.align`) picks the side to align with the
            default threshold c = 0.5; pass subspaces at ``align.align_rank`` for an exact map).

    Returns:
        2-D float32 factors on ``src``'s device with ``alpha=None`` (scale folded into ``up``):
        rank r for ``copy``/``project``/``exact``/``align``, 2r for ``prolora`` (not yet re-compressed).

    Raises:
        OptionError: ``method`` is not a standard-LoRA method.
        ShapeMismatchError: the factors do not fit the subspaces.
    """
    if method not in LORA_METHODS:
        raise OptionError(
            f"method {method!r} cannot transfer a standard LoRA layer; use one of {', '.join(LORA_METHODS)} "
            "('lorax' is for LoRA-X adapters)."
        )
    _check_pair(src, tgt, f.out_features, f.in_features, "LoRA layer")
    if method == "align":
        return align_lora(f, alignment_test(src, tgt, similarity_rank(src.rank, *src.shape)))
    device = src.U.device
    up = f.up2d().to(device=device, dtype=torch.float32) * f.scale
    down = f.down2d().to(device=device, dtype=torch.float32)
    if method == "copy":
        return LoraFactors(up=up.clone(), down=down.clone())
    if method == "project":
        return LoraFactors(up=_P(tgt.U, up), down=_Pr(down, tgt.V))
    # Split ΔW's factors into the source subspace and its complement (ProLoRA, arXiv 2506.04244: the dominant/complement split).
    up_par = _P(src.U, up)
    up_perp = up - up_par
    down_par = _Pr(down, src.V)
    down_perp = down - down_par
    # Map each part into the matching target space: P_t(·) for the subspace part, Q_t(·) = (·) − P_t(·)
    # for the complement part.
    up_par_t = _P(tgt.U, up_par)
    up_perp_t = up_perp - _P(tgt.U, up_perp)
    down_par_t = _Pr(down_par, tgt.V)
    down_perp_t = down_perp - _Pr(down_perp, tgt.V)
    if method == "prolora":
        return LoraFactors(up=torch.cat([up_par_t, up_perp_t], dim=1), down=torch.cat([down_par_t, down_perp_t], dim=0))
    # exact: the four block terms (par,par) + (perp,perp) + (par,perp) + (perp,par) sum to one
    # product (up_par_t + up_perp_t)(down_par_t + down_perp_t) of the original rank.
    return LoraFactors(up=up_par_t + up_perp_t, down=down_par_t + down_perp_t)


def _core_matrix(f: LoraXFactors, device: torch.device) -> torch.Tensor:
    core = f.core.to(device=device, dtype=torch.float32)
    return torch.diag(core) if core.ndim == 1 else core


def lorax_to_lora(f: LoraXFactors, src: Subspace) -> LoraFactors:
    """A LoRA-X layer as ordinary factors on its own base: ``up = U_R·core``, ``down = V_Rᵀ``.

    Args:
        f: the LoRA-X layer (core ``(R,)`` or ``(R, R)``).
        src: the source weight's subspace with at least R directions.

    Returns:
        2-D float32 factors of rank R on ``src``'s device, ``alpha=None``.

    Raises:
        RankError: ``src`` holds fewer than R directions.
    """
    R = f.rank
    if src.rank < R:
        raise RankError(
            f"LoRA-X core has rank {R} but the source subspace holds only {src.rank} directions; "
            f"compute the subspace with rank >= {R} (a layer of shape {src.shape} allows at most {min(src.shape)})."
        )
    s = src.truncate(R)
    return LoraFactors(up=s.U @ _core_matrix(f, s.U.device), down=s.V.T.contiguous())


def transfer_lorax_layer(f: LoraXFactors, src: Subspace, tgt: Subspace) -> LoraFactors:
    """Move one LoRA-X layer with LoRA-X Eq. 3: ``up = U_t (U_tᵀ U_s core V_sᵀ V_t)``, ``down = V_tᵀ``.

    Both bases are truncated to the core's rank R. When R covers a whole side (R ≥ out or
    R ≥ in) that side's projection is the identity; with R ≥ both it is a copy of ΔW (LoRA-X, arXiv 2501.16559, Eq. 3).

    Args:
        f: the LoRA-X layer; src, tgt: subspaces with at least R directions, same shape.

    Returns:
        2-D float32 factors of rank R on ``src``'s device, ``alpha=None``: ``up`` (m, R), ``down`` (R, n).

    Raises:
        RankError: a subspace holds fewer than R directions.
        ShapeMismatchError: source and target shapes differ.
    """
    R = f.rank
    if tgt.rank < R:
        raise RankError(
            f"LoRA-X core has rank {R} but the target subspace holds only {tgt.rank} directions; "
            f"compute it with rank >= {R}."
        )
    if src.shape != tgt.shape:
        raise ShapeMismatchError(
            f"LoRA-X transfer needs equal shapes; source {src.shape} vs target {tgt.shape}. "
            "Cross-width transfer degenerates to copying ΔΣ (LoRA-X, arXiv 2501.16559, §4.2.2: the projected bases equal the target's) and is not offered."
        )
    source = lorax_to_lora(f, src)
    t = tgt.truncate(R).to(source.up.device)
    # U_tᵀ (U_s core) (V_sᵀ V_t): an R×R core in the target basis; never an m×n product.
    core_t = (t.U.T @ source.up) @ (source.down @ t.V)
    return LoraFactors(up=t.U @ core_t, down=t.V.T.contiguous())


def choose_method(layer: AdapterLayer, requested: str, *, conv: bool = False) -> str:
    """The method actually used for a layer.

    ``auto`` rule: ``lorax`` (Eq. 3) for LoRA-X layers; for standard LoRA layers ``copy`` when
    the base weight is a convolution (``conv=True``: 1×1 or 3×3) and ``exact`` otherwise —
    always behind the similarity gate (``auto`` never transfers a layer below the threshold,
    whichever method it picks).

    Why: ``exact`` is the one projection method that returns ΔW unchanged when target = source
    and tends to it as the target approaches the source; ProLoRA's two-term split drops the
    cross blocks (50–90 % relative error on random LoRAs on a near-identical target) and
    ``project`` keeps only the part of ΔW inside the top-R spaces (18–40 % of its norm in the
    quality benchmark). In the quality benchmark (``benchmarks/results/QUALITY.md``) the conv
    layers were the least similar ones and the only place ``exact`` trailed ``copy`` (by 0.05–0.06
    of the style score, within one seed-std); copying them made ``auto`` match ``copy`` within
    0.01 on the fine-tuned target while keeping the similarity gate that refuses unrelated bases.
    A standard method requested for a LoRA-X layer applies to its factors on the source base
    (``lorax_to_lora``).

    ``auto`` never returns ``align`` here: it switches to ``align`` per layer in
    ``transfer_adapter``, only where the similarity gate would skip the layer and
    :func:`lorax_core.align.alignment_test` finds one side re-parameterised (so every layer the
    gate passes keeps the method above).

    Args:
        layer: the adapter layer.
        requested: ``TransferOptions.method``.
        conv: whether the layer's base weight is 4-D (a convolution).

    Raises:
        OptionError: unknown method, or ``lorax`` for a standard LoRA layer.
    """
    if requested not in METHODS:
        raise OptionError(f"method {requested!r} is not one of {', '.join(METHODS)}; use 'auto'.")
    if isinstance(layer, LoraXFactors):
        return "lorax" if requested in ("auto", "lorax") else requested
    if requested == "lorax":
        raise OptionError(
            "method 'lorax' needs a LoRA-X adapter (ΔΣ cores), but this is a standard LoRA (up/down); "
            "use 'auto', 'exact', 'prolora', 'project' or 'copy'."
        )
    if requested == "auto":
        return "copy" if conv else "exact"
    return requested


# ----------------------------------------------------------------------------------------------
# transfer_adapter


def _source_norm(layer: AdapterLayer) -> float:
    if isinstance(layer, LoraXFactors):
        # ‖U core Vᵀ‖_F = ‖core‖_F because U and V have orthonormal columns.
        return float(layer.core.detach().to(torch.float64).norm())
    return factored_norm(layer.up2d(), layer.down2d(), layer.scale)


def _layer_dtype(layer: AdapterLayer) -> torch.dtype:
    if isinstance(layer, LycorisLayer):
        return layer.file_dtype  # its factors are float32 products of the file's tensors
    return layer.core.dtype if isinstance(layer, LoraXFactors) else layer.up.dtype


def restore_layout(up2d: torch.Tensor, down2d: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> LoraFactors:
    """CPU factors in the LoRA's dtype; conv layers as ``up (out, k, 1, 1)``, ``down (k, in, kh, kw)``.

    Factors that would overflow the LoRA's dtype (large values in float16) stay float32.
    """
    up = up2d.to(device="cpu", dtype=dtype)
    down = down2d.to(device="cpu", dtype=dtype)
    if nonfinite_count(up) or nonfinite_count(down):  # fp8 LoRAs: e4m3fn overflows to NaN
        up, down = up2d.to(device="cpu", dtype=torch.float32), down2d.to(device="cpu", dtype=torch.float32)
    if len(shape) == 4:
        up = up.reshape(up.shape[0], up.shape[1], 1, 1)
        down = down.reshape(down.shape[0], *shape[1:])
    return LoraFactors(up=up.contiguous(), down=down.contiguous(), alpha=None)


class _Skip(Exception):  # noqa: N818 - internal control flow, never escapes this module
    """A layer is skipped: ``reason`` is the value, ``text`` the report's phrase (default: the reason's)."""

    def __init__(self, reason: SkipReason, detail: str, text: str | None = None) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.detail = detail
        self.text = reason.text if text is None else text


def _completeness_note(R: int, m: int, n: int, method: str) -> str:
    if method in ("copy", "align"):
        return ""
    if R >= m and R >= n:
        return f"rank R={R} covers the whole {m}×{n} layer: the projection is the identity (a copy)"
    if R >= m:
        return f"rank R={R} covers the output side ({m}): only the input side is projected"
    if R >= n:
        return f"rank R={R} covers the input side ({n}): only the output side is projected"
    return ""


def transfer_adapter(
    layers: Mapping[str, AdapterLayer],
    source: WeightSource,
    target: WeightSource,
    options: TransferOptions,
    *,
    names: Mapping[str, str] | None = None,
    skipped: Mapping[str, Skip | str] | None = None,
    similarity: SimilarityTable | None = None,
    cache: SubspaceCache | None = None,
    progress: Callable[[int, int], None] | None = None,
    provider: SubspaceProvider | None = None,
) -> TransferResult:
    """Transfer a whole adapter from the source base model to the target base model.

    For every layer: find the target layer (``options.match``), check that the factors fit the
    source weight and that the target has the same width (never padded), compute Φ at the
    decision rank, skip layers below ``threshold_for(chance, options.threshold)`` unless
    ``options.force``, transfer with ``choose_method(layer, options.method)``, optionally
    re-compress to ``options.output_rank``, and record a :class:`LayerReport`.

    Args:
        layers: ``{source model key: LoraFactors | LoraXFactors}``. Never modified.
        source, target: the two base models (read one weight at a time).
        options: see :class:`TransferOptions`.
        names: model key → display name for the report (default: the model key).
        skipped: display name → :class:`~lorax_core.types.Skip` (its code and phrase) for layers
            the caller left out while planning (``pipeline.plan_transfer``); a plain string is a
            reason coded ``unresolved``. They are reported as skipped (and count as skips in
            strict mode).
        similarity: a table from :func:`compute_similarity`; an entry with the same source and
            target key is reused (its Φ and chance; the threshold comes from ``options``).
        cache: a subspace cache (``get_or_compute``); without one each base weight is
            decomposed once per call.
        progress: ``progress(done, total)``, called once per layer (skipped ones included), and
            with an unchanged ``done`` after each chunk of batched decompositions (a cancel
            point: a host's callback may raise to stop the transfer).
        provider: the subspace provider to use (default: one over ``cache`` on
            ``options.device``, batched exactly on CUDA; see :class:`SubspaceProvider`).

    ``options.rank`` is the subspace rank for standard LoRA layers; a LoRA-X layer always uses
    its own core rank R (its ΔΣ lives in the source's top-R basis).

    Returns:
        :class:`TransferResult`: ``layers`` keyed by *target* model key (``LoraFactors`` in the
        LoRA's dtype, on CPU, ``alpha=None`` with the scale folded into ``up``, conv layers in the
        target weight's conv layout) and the report (every input layer has exactly one record).

    Raises:
        OptionError: an option does not apply (``method='lorax'`` on a standard LoRA layer).
        LayerSkippedError: ``options.strict`` and some layer would be skipped.
        NothingTransferableError: no layer was transferred.
    """
    names = dict(names or {})
    skipped = dict(skipped or {})
    for key, layer in layers.items():
        try:
            choose_method(layer, options.method)
        except OptionError as error:
            raise OptionError(f"layer {names.get(key, key)}: {error}") from None
    provider = provider or SubspaceProvider(cache, options.device)
    report = TransferReport(options=asdict(options))
    out: dict[str, LoraFactors] = {}
    total = len(layers) + len(skipped)
    done = 0

    def record(entry: LayerReport, detail: str = "") -> None:
        nonlocal done
        if entry.status == "skipped" and options.strict:
            raise LayerSkippedError(
                f"layer {entry.key}: skipped because {entry.reason}{f' ({detail})' if detail else ''}. "
                "strict mode stops at the first skipped layer; fix the cause, or turn strict off to get a "
                "report of all skipped layers."
            )
        report.layers.append(entry)
        done += 1
        if progress is not None:
            progress(done, total)

    for display, skip in skipped.items():
        code, reason = (skip.code, skip.detail) if isinstance(skip, Skip) else (SkipReason.UNRESOLVED, skip)
        record(LayerReport(key=display, status="skipped", reason=reason, method=options.method, code=code), reason)

    matches = _resolve_targets(layers, source, target, options, provider)
    keys = list(layers)
    run = _Run(source, target, options, provider, similarity)

    def request(key: str) -> tuple[str, str, int] | None:
        return _subspace_request(key, layers[key], matches.get(key), source, target, options)

    try:
        # On CUDA the provider decomposes in batches: each chunk's subspaces are made ready at
        # once and freed after use (prefetched_chunks).
        for chunk in prefetched_chunks(provider, source, target, keys, request):
            if provider.batched and progress is not None:
                progress(done, total)  # a cancel point for hosts whose progress callback checks it
            for key in chunk:
                layer = layers[key]
                display = names.get(key, key)
                conv = key in matches and len(source.shape(key)) == 4
                method = choose_method(layer, options.method, conv=conv)
                entry = LayerReport(key=display, status="skipped", reason="", method=method, source_key=key)
                try:
                    factors = _transfer_one(run, key, layer, method, matches.get(key), entry)
                except _Skip as skip:
                    entry.code, entry.reason = skip.reason, skip.text
                    record(entry, skip.detail)
                    continue
                except NonFiniteError as exc:  # the projections or re-compression overflowed
                    entry.code, entry.reason = SkipReason.OVERFLOW, SkipReason.OVERFLOW.text
                    record(entry, str(exc))
                    continue
                out[entry.target_key or key] = factors
                record(entry)
    finally:
        provider.flush()  # cache files written in the background are complete when this returns

    if not report.transferred:
        _raise_nothing(report, options)
    return TransferResult(layers=out, report=report)


def _gated(layer: AdapterLayer, options: TransferOptions) -> bool:
    """Whether the layer is decomposed and similarity-tested: every method but ``copy`` asked for by
    name on a standard LoRA (what loading the LoRA directly does); ``copy`` chosen by ``auto`` is gated."""
    return options.method != "copy" or isinstance(layer, LoraXFactors)


def _subspace_rank(layer: AdapterLayer, options: TransferOptions, m: int, n: int) -> int:
    """R for a layer: a LoRA-X layer's own core rank (its ΔΣ lives in that basis), else ``options.rank``
    clipped to the ``(m, n)`` weight."""
    return layer.rank if isinstance(layer, LoraXFactors) else min(options.rank, m, n)


def _subspace_request(
    key: str,
    layer: AdapterLayer,
    match: LayerMatch | None,
    source: WeightSource,
    target: WeightSource,
    options: TransferOptions,
) -> tuple[str, str, int] | None:
    """The ``(source key, target key, R)`` subspaces :func:`_transfer_one` will ask for, or ``None``
    for a layer it skips before (or without) decomposing. ``align`` asks for a larger rank on its own."""
    if not _gated(layer, options):
        return None
    try:
        geo = _geometry(key, layer, match, source, target)
    except _Skip:
        return None
    return key, geo.target_key, _subspace_rank(layer, options, geo.m, geo.n)


def _resolve_targets(
    layers: Mapping[str, AdapterLayer],
    source: WeightSource,
    target: WeightSource,
    options: TransferOptions,
    provider: SubspaceProvider,
) -> dict[str, LayerMatch]:
    """The target pairing of every layer the source model has (layers it lacks have no entry)."""
    source_keys = set(source.keys())
    present = [k for k in layers if k in source_keys]
    return match_layers(
        present,
        source,
        target,
        mode=options.match,
        rank=options.rank,
        threshold=options.threshold,
        provider=provider,
    )


@dataclass(frozen=True)
class _Geometry:
    """A layer's pairing and shapes, once every check that needs no decomposition has passed.

    ``m, n`` is the flattened ``(out, in·kh·kw)`` shape both weights share; ``norm`` is ‖ΔW‖_F
    of the source update (float64, from the factors' Gram matrices), finite and non-zero.
    """

    target_key: str
    target_shape: tuple[int, ...]
    m: int
    n: int
    norm: float


def _geometry(
    key: str,
    layer: AdapterLayer,
    match: LayerMatch | None,
    source: WeightSource,
    target: WeightSource,
    entry: LayerReport | None = None,
) -> _Geometry:
    """Decide a layer's geometry, or its skip (:class:`_Skip`), reading shapes only, never weights.

    The checks run in the report's order of precedence: the source has the weight, it is linear
    or conv, ‖ΔW‖ fits float32, the factors fit the weight, there is a partner, the partner is
    linear or conv of the same width, ΔW is not zero, a LoRA-X core fits the layer. ``entry``
    (when given) records what is known as it becomes known, so a skipped layer's record shows
    the shapes and the norm that decided it. ``match`` is ``None`` when the source has no ``key``.
    """
    if match is None:
        raise _Skip(SkipReason.NO_SOURCE, f"source model key {key!r}")
    sshape = tuple(int(d) for d in source.shape(key))
    if entry is not None:
        entry.source_shape = sshape
    if len(sshape) not in (2, 4):
        raise _Skip(SkipReason.WEIGHT_NDIM, f"source weight {key!r} has shape {sshape}")
    norm = _source_norm(layer)
    # ‖ΔW‖ (float64) beyond float32's range: no loader can apply this update, even when the
    # factors themselves are finite (copy would otherwise write them unchanged).
    overflow = not math.isfinite(norm) or norm > torch.finfo(torch.float32).max
    if entry is not None:
        entry.norm_source = None if overflow else norm
    if overflow:
        raise _Skip(SkipReason.OVERFLOW, "‖ΔW‖ exceeds float32's range")
    problem = shape_problem(layer, sshape)
    if problem:
        raise _Skip(SkipReason.SOURCE_SHAPE, problem)
    if match.target_key is None:
        raise _Skip(match.code or SkipReason.NO_PARTNER, f"source shape {sshape}", text=match.reason)
    tkey = match.target_key
    tshape = tuple(int(d) for d in target.shape(tkey))
    if entry is not None:
        entry.target_key, entry.target_shape = tkey, tshape
    if len(tshape) not in (2, 4):
        raise _Skip(SkipReason.WEIGHT_NDIM, f"target weight {tkey!r} has shape {tshape}")
    m, n = flat_shape(sshape)
    if flat_shape(tshape) != (m, n):
        raise _Skip(SkipReason.WIDTH, f"source {sshape} vs target {tshape}")
    if norm == 0.0:
        raise _Skip(SkipReason.ZERO, "‖ΔW‖ = 0")
    if isinstance(layer, LoraXFactors) and layer.rank > min(m, n):
        raise _Skip(SkipReason.LORAX_RANK, f"core rank {layer.rank} > min({m}, {n})")
    return _Geometry(tkey, tshape, m, n, norm)


@dataclass(frozen=True)
class _Run:
    """What every layer of one :func:`transfer_adapter` call shares: the models, the options, the
    subspace supply and the similarity table to reuse."""

    source: WeightSource
    target: WeightSource
    options: TransferOptions
    provider: SubspaceProvider
    similarity: SimilarityTable | None


def _transfer_one(
    run: _Run, key: str, layer: AdapterLayer, method: str, match: LayerMatch | None, entry: LayerReport
) -> LoraFactors:
    """One layer, top-down: geometry → (gate and project | copy) → finish.

    Fills ``entry`` and returns the output factors, or raises :class:`_Skip`.
    """
    source, target, options = run.source, run.target, run.options
    geo = _geometry(key, layer, match, source, target, entry)
    notes: list[str] = []
    if match is not None and match.by == "similarity":
        notes.append(f"paired by similarity with {geo.target_key}")
    # copy asked for by name skips the similarity test (it is what loading the LoRA directly
    # does); every other method, and copy chosen by auto, is gated on it.
    if _gated(layer, options):
        flat, method = _gate_and_project(run, key, layer, method, geo, entry, notes)
    else:
        device = torch.device(options.device)
        flat = LoraFactors(
            up=layer.up2d().to(device=device, dtype=torch.float32) * layer.scale,
            down=layer.down2d().to(device=device, dtype=torch.float32),
        )

    def magnitude(m: torch.Tensor) -> torch.Tensor:  # a DoRA layer's magnitude, re-derived from both base weights
        return dora_magnitude(m, source.get(key), target.get(geo.target_key))

    return _finish(flat, method, layer, geo, options, entry, notes, magnitude)


def _gate_and_project(
    run: _Run, key: str, layer: AdapterLayer, method: str, geo: _Geometry, entry: LayerReport, notes: list[str]
) -> tuple[LoraFactors, str]:
    """Decompose, test similarity (and, for ``auto``/``align``, a re-parameterised side), then project.

    Returns the flat float32 factors and the method actually used (``auto`` may switch to
    ``align``); fills the similarity fields of ``entry`` and appends to ``notes``; raises
    :class:`_Skip` for a damaged weight or a layer below the threshold (unless ``force``).
    """
    source, target, options, provider = run.source, run.target, run.options, run.provider
    tkey, m, n = geo.target_key, geo.m, geo.n
    R = _subspace_rank(layer, options, m, n)
    try:
        src = provider.get(source, key, R)
        tgt = provider.get(target, tkey, R)
    except NonFiniteError as exc:
        raise _Skip(SkipReason.NONFINITE_WEIGHT, str(exc)) from None
    sim = _similarity_for(key, tkey, src, tgt, R, m, n, options, run.similarity)
    entry.phi_left, entry.phi_right = sim.phi_left, sim.phi_right
    entry.chance, entry.similarity_rank, entry.threshold = sim.chance, sim.rank, sim.threshold
    # A layer the gate refuses may be the source layer with one side in another basis (hidden
    # units permuted): auto aligns it instead of skipping it (lorax_core.align). Only layers
    # auto would skip change; with force, auto keeps its forced method as before. Without one
    # agreeing side there is no anchor, so unrelated layers cost no extra decomposition.
    test: AlignmentTest | None = None
    skipped_by_auto = options.method == "auto" and not sim.passed and not options.force
    if method == "align" or (skipped_by_auto and _one_side_agrees(sim)):
        k = sim.rank if sim.rank is not None else similarity_rank(R, m, n)
        src_a = provider.get(source, key, align_rank(m, n))
        tgt_a = provider.get(target, tkey, align_rank(m, n))
        test = alignment_test(src_a, tgt_a, k, options.threshold)
        if method != "align" and test.reparameterised:
            method = entry.method = "align"
            notes.append(f"auto: {test.describe()}; aligned by {test.side_map.describe()}")
    if not sim.passed and not (method == "align" and test is not None and test.reparameterised):
        if not options.force:
            raise _Skip(
                SkipReason.BELOW,
                f"Φ={sim.phi:.3f} < threshold {sim.threshold:.3f} (chance {sim.chance:.3f}, rank {sim.rank})",
            )
        notes.append(f"forced: Φ={sim.phi:.3f} below threshold {sim.threshold:.3f}")
    if sim.rank is not None and sim.rank < R:
        notes.append(f"similarity decided at rank {sim.rank} (R={R} is not well below {min(m, n)})")
    if method == "align" and test is not None:
        lora = lorax_to_lora(layer, src) if isinstance(layer, LoraXFactors) else layer
        flat = align_lora(lora, test)
    elif isinstance(layer, LoraXFactors):
        flat = (
            transfer_lorax_layer(layer, src, tgt)
            if method == "lorax"
            else transfer_lora_layer(lorax_to_lora(layer, src), src, tgt, method)
        )
    else:
        flat = transfer_lora_layer(layer, src, tgt, method)
    note = _completeness_note(R, m, n, method)
    if note:
        notes.append(note)
    if method == "copy" and options.method == "auto":
        notes.append("auto: convolution layers keep their update (copy)")
    return flat, method


def _finish(
    flat: LoraFactors,
    method: str,
    layer: AdapterLayer,
    geo: _Geometry,
    options: TransferOptions,
    entry: LayerReport,
    notes: list[str],
    magnitude: Callable[[torch.Tensor], torch.Tensor],
) -> LoraFactors:
    """Re-factor at the true rank, check the result, record it and give it the target's layout and the LoRA's dtype.

    A LyCORIS layer is written by :func:`_write_lycoris` (``magnitude`` maps its DoRA magnitude)."""
    up, down = flat.up, flat.down
    energy = 1.0
    # copy keeps the caller's factors as they are unless a smaller rank is asked for; every other
    # method is re-factored at its true rank (prolora's 2r columns are often dependent).
    if method != "copy" or (options.output_rank is not None and options.output_rank < up.shape[1]):
        # "Numerically zero" relative to the source update: fp32 rounding of the projections.
        atol = geo.norm * max(geo.m, geo.n) * torch.finfo(torch.float32).eps
        up, down, energy = recompress(up, down, options.output_rank, atol=atol)
    if up.shape[1] == 0:
        entry.norm_target = 0.0
        raise _Skip(SkipReason.PROJECTED_ZERO, f"method {method}")
    if nonfinite_count(up) or nonfinite_count(down):
        raise _Skip(SkipReason.OVERFLOW, f"method {method} produced NaN or Inf factors")
    entry.status = "transferred"
    entry.energy_kept = energy
    entry.output_rank = int(up.shape[1])
    entry.norm_target = factored_norm(up, down)
    if isinstance(layer, LycorisLayer):
        return _write_lycoris(layer, up, down, method, geo, options, entry, notes, magnitude)
    restored = restore_layout(up, down, geo.target_shape, _layer_dtype(layer))
    if restored.up.dtype != _layer_dtype(layer):
        notes.append(f"kept in float32: the update overflows {_layer_dtype(layer)}")
    entry.reason = "; ".join(notes)
    return restored


def _write_lycoris(
    layer: LycorisLayer,
    up: torch.Tensor,
    down: torch.Tensor,
    method: str,
    geo: _Geometry,
    options: TransferOptions,
    entry: LayerReport,
    notes: list[str],
    magnitude: Callable[[torch.Tensor], torch.Tensor],
) -> LoraFactors:
    """A transferred LyCORIS layer in its own type, or as a LoRA (:func:`lorax_core.lycoris.write_back`)."""
    written = write_back(
        layer,
        up,
        down,
        copied=method == "copy",
        restore=lambda u, d: restore_layout(u, d, geo.target_shape, layer.file_dtype),
        magnitude=magnitude,
        energy=options.lycoris_energy,
        cap=options.output_rank,
    )
    out = written.layer
    # Energy kept by output_rank in the re-factoring and by the write-back's truncation, together.
    kept = (entry.energy_kept or 1.0) * written.energy_kept
    entry.written_as, entry.energy_kept = written.written_as, kept
    entry.truncation_error = written.error if kept >= 1.0 else math.sqrt(max(0.0, 1.0 - kept))
    if not isinstance(out, LycorisLayer) or not out.parts:
        entry.output_rank = out.rank
        entry.norm_target = factored_norm(out.up2d(), out.down2d(), out.scale)
    if layer.kind in ("loha", "lokr") and written.written_as.startswith("lora"):
        notes.append(f"{layer.kind} written as a rank-{out.rank} LoRA (relative truncation error {written.error:.2e})")
    if layer.densified:
        notes.append(f"{layer.kind}: densified (no exact factored form smaller than the weight)")
    entry.reason = "; ".join(notes)
    return out


def _one_side_agrees(sim: LayerSimilarity) -> bool:
    """Whether one side of a compared pair passes on its own: an anchor for ``align``."""
    if sim.phi_left is None or sim.phi_right is None or sim.threshold is None:
        return False
    return max(sim.phi_left, sim.phi_right) >= sim.threshold


def _similarity_for(
    key: str,
    tkey: str,
    src: Subspace,
    tgt: Subspace,
    R: int,
    m: int,
    n: int,
    options: TransferOptions,
    table: SimilarityTable | None,
) -> LayerSimilarity:
    if table is not None:
        entry = table.get(key)
        if entry is not None and entry.target_key == tkey and entry.phi is not None and entry.chance is not None:
            tau = threshold_for(entry.chance, options.threshold)
            return LayerSimilarity(
                key, tkey, entry.phi_left, entry.phi_right, entry.chance, entry.rank, tau, entry.phi >= tau
            )
    return layer_similarity(src, tgt, similarity_rank(R, m, n), options.threshold, source_key=key, target_key=tkey)


def _raise_nothing(report: TransferReport, options: TransferOptions) -> None:
    reasons = Counter((r.code, r.reason) for r in report.skipped)
    if not reasons:
        raise NothingTransferableError(
            "the adapter has no layers to transfer; check that the LoRA file was read correctly."
        )
    (code, reason), count = reasons.most_common(1)[0]
    fixes = {
        SkipReason.BELOW: f"lower the threshold (now {options.threshold}), set force, or check the source/target "
        "base models are related",
        SkipReason.WIDTH: "use a target model of the same family and width as the source",
        SkipReason.SOURCE_SHAPE: "choose the base model the LoRA was trained on as the source",
        SkipReason.NO_SOURCE: "choose the base model the LoRA was trained on as the source",
        SkipReason.ZERO: "the LoRA is empty (all-zero); check the file",
        SkipReason.NONFINITE_WEIGHT: "re-download the source and target models (their weights hold NaN or Inf)",
        SkipReason.OVERFLOW: "check the LoRA file (its factors or alpha are implausibly large)",
        SkipReason.WEIGHT_NDIM: "choose base models whose weights are linear or conv layers",
    }
    fix = fixes.get(code, f"check the source and target base models and the match option (now {options.match!r})")
    raise NothingTransferableError(
        f"none of the {len(report.layers)} layers was transferred; most common reason ({count} layers): "
        f"{reason}. Fix: {fix}."
    )
