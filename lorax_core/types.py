"""Data types shared by every part of the core.

Conventions (used everywhere in ``lorax_core``):

* A LoRA layer's update is ``ΔW = scale · up @ down`` with ``up`` of shape ``(out, r)`` and
  ``down`` of shape ``(r, in)``; ``scale = alpha / r`` when ``alpha`` is given, else 1
  (kohya / ComfyUI ``LoRAAdapter`` convention). Conv layers keep their file shapes:
  ``up`` is ``(out, r, 1, 1)`` and ``down`` is ``(r, in, kh, kw)``; the maths works on the
  flattened ``(out, in·kh·kw)`` view (:meth:`LoraFactors.up2d` / :meth:`LoraFactors.down2d`).
* A LoRA-X layer is ``ΔW = U_R · core · V_Rᵀ`` where ``U_R``/``V_R`` are the top-R singular
  bases of the *source* base weight (LoRA-X, arXiv 2501.16559, Eq. 1–2) and ``core`` is the
  diagonal ΔΣ (shape ``(R,)``) or a full ``(R, R)`` matrix.
* Model weights are addressed by *model keys*: the host's state-dict names, e.g.
  ``diffusion_model.input_blocks.1.1.proj_in.weight``. LoRA files address layers by their
  own *layer names* (``lora_unet_…``); the formats layer resolves one to the other.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Literal, Protocol, runtime_checkable

import torch

from .errors import NonFiniteError, OptionError, ShapeMismatchError

__all__ = [
    "METHODS",
    "AdapterLayer",
    "DictWeights",
    "LayerReport",
    "LoraFactors",
    "LoraXFactors",
    "Method",
    "Skip",
    "SkipReason",
    "SkipText",
    "Status",
    "TransferOptions",
    "TransferReport",
    "TransferResult",
    "WeightSource",
    "check_device",
    "flat_shape",
    "json_default",
    "json_safe",
    "shape_problem",
]

Method = Literal["auto", "lorax", "prolora", "exact", "project", "copy", "align"]
METHODS: tuple[str, ...] = ("auto", "lorax", "prolora", "exact", "project", "copy", "align")
Status = Literal["transferred", "skipped"]


class SkipText(str):
    """A per-layer skip phrase from a reader that also carries its report code.

    The text is what the report shows; :attr:`code` is a :class:`SkipReason` value
    (``malformed_layer`` or ``unsupported``) that planning records as the layer's code
    (``pipeline.plan_transfer``). Behaves as a plain ``str`` everywhere else.
    """

    code: SkipReason

    def __new__(cls, text: str, code: SkipReason) -> SkipText:
        obj = super().__new__(cls, text)
        obj.code = code
        return obj


@dataclass(frozen=True)
class LoraFactors:
    """One standard LoRA layer, ``ΔW = scale · up @ down``.

    Attributes:
        up: ``(out, r)``, or ``(out, r, 1, 1)`` for conv layers. Any float dtype/device.
        down: ``(r, in)``, or ``(r, in, kh, kw)`` for conv layers. Same dtype/device as ``up``.
        alpha: kohya-style alpha; ``None`` means scale 1.
    """

    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.up.ndim not in (2, 4) or self.down.ndim not in (2, 4):
            raise ShapeMismatchError(
                f"LoRA factors must be 2-D (linear) or 4-D (conv); got up {tuple(self.up.shape)} and "
                f"down {tuple(self.down.shape)}. Check that the file is a LoRA (lora_up/lora_down) file."
            )
        if self.up.ndim == 4 and tuple(self.up.shape[2:]) != (1, 1):
            # A conv LoRA's up is a 1×1 convolution (the kernel lives in down); anything else
            # would silently be read as a different update by up2d().
            raise ShapeMismatchError(
                f"LoRA up of shape {tuple(self.up.shape)} is not (out, r) or (out, r, 1, 1); the kernel of a conv "
                "LoRA belongs in down. The file is corrupt or in a layout this pack does not read."
            )
        if self.up.shape[1] != self.down.shape[0]:
            raise ShapeMismatchError(
                f"LoRA rank mismatch: up {tuple(self.up.shape)} has rank {self.up.shape[1]} but down "
                f"{tuple(self.down.shape)} has rank {self.down.shape[0]}; the file is corrupt or its up/down "
                "tensors are swapped."
            )
        if self.alpha is not None and not math.isfinite(self.alpha):
            raise NonFiniteError(f"LoRA alpha is {self.alpha}; it must be a finite number. The file is corrupt.")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / rank`` (1.0 without alpha, or for a rank-0 layer)."""
        if self.alpha is None or self.rank == 0:
            return 1.0
        return float(self.alpha) / self.rank

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def in_features(self) -> int:
        """Width of the flattened input side, ``in·kh·kw`` for conv layers."""
        return math.prod(int(d) for d in self.down.shape[1:])

    @property
    def kernel(self) -> tuple[int, ...] | None:
        """``(in, kh, kw)`` for conv layers, ``None`` for linear ones."""
        return tuple(int(d) for d in self.down.shape[1:]) if self.down.ndim == 4 else None

    def up2d(self) -> torch.Tensor:
        """``up`` as ``(out, r)`` (a view; no copy)."""
        return self.up.reshape(self.up.shape[0], self.up.shape[1])

    def down2d(self) -> torch.Tensor:
        """``down`` as ``(r, in·kh·kw)`` (a view; no copy)."""
        return self.down.reshape(self.down.shape[0], -1)


@dataclass(frozen=True)
class LoraXFactors:
    """One LoRA-X layer: ``ΔW = U_R · core · V_Rᵀ`` in the source weight's top-R bases.

    Attributes:
        core: ``(R,)`` diagonal ΔΣ (the paper's parameterisation) or a full ``(R, R)`` core.
        shape: the base weight's shape, ``(out, in)`` or ``(out, in, kh, kw)``; the basis is
            recomputed from the source weight at transfer time (fp32 SVD, deterministic signs).
    """

    core: torch.Tensor
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.core.ndim not in (1, 2) or (self.core.ndim == 2 and self.core.shape[0] != self.core.shape[1]):
            raise ShapeMismatchError(
                f"LoRA-X core must be a vector (R,) or a square matrix (R, R); got {tuple(self.core.shape)}."
            )

    @property
    def rank(self) -> int:
        return int(self.core.shape[0])


AdapterLayer = LoraFactors | LoraXFactors


@runtime_checkable
class WeightSource(Protocol):
    """Read-only, lazy access to a base model's weights by model key.

    Implementations read one tensor at a time (memory-mapped files, a ComfyUI ``ModelPatcher``)
    so that two full models are never held in memory. ``get`` may return any dtype on any
    device; callers upcast to float32 themselves.
    """

    @property
    def fingerprint(self) -> str:
        """A cheap, stable identifier of the weights (used for caching and provenance)."""
        ...

    def keys(self) -> Iterable[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def get(self, key: str) -> torch.Tensor: ...


class DictWeights:
    """A :class:`WeightSource` over an in-memory ``{model key: tensor}`` mapping.

    The fingerprint defaults to a hash of the key names, shapes and a strided sample of each
    tensor's values, so two different synthetic models never share cache entries.
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], fingerprint: str | None = None) -> None:
        self._weights = dict(weights)
        self._fingerprint = fingerprint

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            import hashlib

            h = hashlib.sha256()
            for key in sorted(self._weights):
                t = self._weights[key]
                h.update(key.encode())
                h.update(str(tuple(t.shape)).encode())
                flat = t.detach().reshape(-1)
                step = max(1, flat.numel() // 64)
                h.update(flat[::step].to(torch.float32).cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def keys(self) -> Iterator[str]:
        return iter(self._weights)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._weights[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self._weights[key]

    def __contains__(self, key: object) -> bool:
        return key in self._weights


@dataclass(frozen=True)
class TransferOptions:
    """Options of a transfer; every field is documented in the README's method section.

    Attributes:
        method: ``lorax`` (LoRA-X Eq. 3, for LoRA-X adapters), ``prolora`` (ProLoRA's two-term
            subspace/complement split, arXiv 2506.04244), ``exact`` (the four-block variant that
            also keeps the cross blocks ProLoRA drops), ``project`` (plain Eq. 3 applied to a
            LoRA), ``copy`` (unchanged factors: what stock ComfyUI does), ``auto`` (see
            ``transfer.choose_method``).
        rank: R, the subspace rank (paper: 320), clipped per layer to ``min(out, in)``.
        threshold: c in ``τ = chance + c·(1 − chance)``, the fraction of the way from chance
            level to perfect overlap a layer must reach to be transferred. In ``[0, 1]``.
        force: transfer layers below the threshold anyway (they are still reported).
        output_rank: re-compress every transferred layer to at most this rank (``None`` keeps
            the natural rank: r for copy/project, ≤2r prolora, ≤4r exact, R for lorax).
        match: ``name`` pairs layers by model key; ``similarity`` pairs same-shape, same-kind
            layers by optimal assignment on Φ; ``auto`` uses names where the target has the
            key and similarity matching for the rest.
        strict: raise :class:`~lorax_core.errors.NothingTransferableError`-style errors on any
            skipped layer instead of reporting it.
        device: where the linear algebra runs (``"cpu"``, ``"cuda"``, …).
        lycoris_energy: a LoHa/LoKr layer whose transferred update is no longer a Hadamard or
            Kronecker product is written as a LoRA of the smallest rank keeping this fraction of
            its squared Frobenius norm (at most ``output_rank``). In ``(0, 1]``.
    """

    method: Method = "auto"
    rank: int = 320
    threshold: float = 0.5
    force: bool = False
    output_rank: int | None = None
    match: Literal["name", "similarity", "auto"] = "auto"
    strict: bool = False
    device: str = "cpu"
    lycoris_energy: float = 0.99

    def __post_init__(self) -> None:
        check_device(self.device)
        if not 0.0 < float(self.lycoris_energy) <= 1.0:
            raise OptionError(
                f"lycoris_energy must be in (0, 1] (the fraction of a LoHa/LoKr update's energy its LoRA keeps); "
                f"got {self.lycoris_energy!r}."
            )
        if self.method not in METHODS:
            raise OptionError(f"method {self.method!r} is not one of {', '.join(METHODS)}.")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise OptionError(f"rank must be a positive integer (the paper uses 320); got {self.rank!r}.")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise OptionError(
                f"threshold must be in [0, 1] (0 = chance level, 1 = identical subspaces); got {self.threshold!r}."
            )
        if self.output_rank is not None and (not isinstance(self.output_rank, int) or self.output_rank < 1):
            raise OptionError(f"output_rank must be a positive integer or None; got {self.output_rank!r}.")
        if self.match not in ("name", "similarity", "auto"):
            raise OptionError(f"match must be 'name', 'similarity' or 'auto'; got {self.match!r}.")


def check_device(device: str | torch.device, *, option: str = "device") -> str:
    """Check that ``device`` names a torch device this process can use, before any work starts.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` …
        option: how the caller's users name the option in messages (the CLI passes ``--device``).

    Returns:
        ``device`` as a string.

    Raises:
        OptionError: not a device name, a device type this PyTorch build or machine lacks, or
            an index beyond the devices present.
    """
    text = str(device)
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise OptionError(f"{option} {text!r} is not a device name; use cpu, cuda, cuda:1 or mps.") from None
    if dev.type == "cpu":
        return text
    module = getattr(torch, dev.type, None)  # torch.cuda, torch.xpu …
    if dev.type == "mps":
        available = torch.backends.mps.is_available
    else:
        available = getattr(module, "is_available", None)
    if available is None or not available():
        raise OptionError(
            f"{option} {text!r}: this machine's PyTorch ({torch.__version__}) cannot use a {dev.type} device; "
            f"use cpu, or install a PyTorch build with {dev.type} support."
        )
    count = getattr(module, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise OptionError(
            f"{option} {text!r}: there are only {count()} {dev.type} device(s), numbered from 0; "
            f"use {dev.type}:0 … {dev.type}:{max(count() - 1, 0)}."
        )
    return text


class SkipReason(str, Enum):
    """Why a layer was skipped: a value, compared and counted as such, from planning to the report.

    The member's value is the stable code written to the report (``LayerReport.code``; the JSON
    keeps the string). :attr:`text` is the short fixed phrase the report shows for skips the
    transfer decides (``LayerReport.reason``), so the report can count layers per reason; a skip
    decided while planning (:class:`Skip`) keeps its own, more specific phrase. The numbers
    behind each verdict are in the LayerReport's other fields.
    """

    UNSUPPORTED = "unsupported", "not a layer type the pack transfers (unknown adapter type or tensor key)"
    HOST_RULE = "host_rule", "left out by the front end's own rule (e.g. a text-encoder layer without a CLIP)"

    NO_SOURCE = "no_source", "the source model has no weight for this layer (is the LoRA for this base model?)"
    SOURCE_SHAPE = "source_shape", "the LoRA factors do not fit the source weight (is the LoRA for this base model?)"
    UNRESOLVED = "unresolved", "the layer could not be read or resolved to a model weight"
    NO_PARTNER = "no_partner", "no target layer to pair with"
    WIDTH = "width", "width mismatch between source and target layer (cannot transfer across widths without data)"
    LORAX_RANK = (
        "lorax_rank",
        "the LoRA-X core rank exceeds the layer's smaller dimension (adapter made for another base?)",
    )
    ZERO = "zero", "zero update (the LoRA does nothing in this layer)"
    PROJECTED_ZERO = (
        "projected_zero",
        "the transferred update is zero (the LoRA lies outside the target layer's subspaces)",
    )
    BELOW = "below_threshold", "similarity below threshold (unrelated subspaces); set force to transfer anyway"
    WEIGHT_NDIM = (
        "weight_ndim",
        "the base weight is neither linear (out, in) nor conv (out, in, kh, kw); no LoRA can patch it",
    )
    NONFINITE_WEIGHT = (
        "nonfinite_weight",
        "a base weight holds NaN, Inf or out-of-range values (the model file is damaged)",
    )
    OVERFLOW = "overflow", "the LoRA's values overflow float32 in this layer (implausibly large factors or alpha)"
    MALFORMED = (
        "malformed_layer",
        "the layer's tensors are damaged or inconsistent (a missing half, mismatched shapes, NaN or Inf)",
    )

    text: str

    def __new__(cls, code: str, text: str) -> SkipReason:
        member = str.__new__(cls, code)
        member._value_ = code
        member.text = text
        return member

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Skip:
    """A layer skipped before the transfer (planning): its code and the specific phrase the report shows."""

    code: SkipReason
    detail: str

    def __str__(self) -> str:
        return self.detail


@dataclass
class LayerReport:
    """What happened to one LoRA layer. JSON-serialisable via :meth:`TransferReport.to_dict`.

    ``written_as`` and ``truncation_error`` are set for LyCORIS, DoRA and ``.diff`` layers
    (:mod:`lorax_core.lycoris`): the type the layer was written as (``loha``, ``lokr``, ``diff``,
    ``lora``, ``lora+dora``) and the relative Frobenius error of writing it so (0 when exact).
    ``key`` is the layer's name as the user knows it (the LoRA file's layer name when known,
    else the model key). ``reason`` is the phrase a person reads (for a transferred layer: notes,
    possibly empty); ``code`` is the skip reason as a value (:class:`SkipReason`, a ``str``
    whose value is the stable code, e.g. ``"below_threshold"``), empty for a transferred layer. Similarity fields are ``None``
    when the layer never got that far.
    """

    key: str
    status: Status
    reason: str
    method: str
    code: SkipReason | Literal[""] = ""
    source_key: str | None = None
    target_key: str | None = None
    source_shape: tuple[int, ...] | None = None
    target_shape: tuple[int, ...] | None = None
    phi_left: float | None = None
    phi_right: float | None = None
    chance: float | None = None
    similarity_rank: int | None = None
    threshold: float | None = None
    norm_source: float | None = None
    norm_target: float | None = None
    energy_kept: float | None = None
    output_rank: int | None = None
    written_as: str | None = None
    truncation_error: float | None = None


@dataclass
class TransferReport:
    """Per-layer records plus totals. Nothing is dropped without a record."""

    layers: list[LayerReport] = field(default_factory=list)
    options: dict[str, object] = field(default_factory=dict)

    @property
    def transferred(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "transferred"]

    @property
    def skipped(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "skipped"]

    def totals(self) -> dict[str, object]:
        reasons: dict[str, int] = {}
        for r in self.skipped:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
        return {
            "layers": len(self.layers),
            "transferred": len(self.transferred),
            "skipped": len(self.skipped),
            "skipped_by_reason": reasons,
        }

    def to_dict(self) -> dict[str, object]:
        return {
            "options": dict(self.options),
            "totals": self.totals(),
            "layers": [asdict(r) for r in self.layers],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The report as strict JSON: NaN and ±Inf (not JSON) are written as ``null``."""
        return json.dumps(json_safe(self.to_dict()), indent=indent, default=json_default, allow_nan=False)

    def summary(self, max_rows: int = 12) -> str:
        """A short human-readable text: totals, a loud note when layers were dropped, skip reasons,
        and the ``max_rows`` least similar transferred layers (said so; the rest are in the JSON report)."""
        totals = self.totals()
        lines = [
            f"LoRA-X transfer: {totals['transferred']} of {totals['layers']} layers transferred, "
            f"{totals['skipped']} skipped."
        ]
        if self.skipped:
            # A partial transfer writes a LoRA that has lost those layers' effect: say it first, not last.
            lines.append(
                f"WARNING: {totals['skipped']} of {totals['layers']} layers were NOT transferred; the result has lost "
                "their effect. Reasons:"
            )
        reasons: dict[str, int] = {}
        for r in self.skipped:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"  skipped {n}: {reason}")

        def phi(r: LayerReport) -> float:
            values = [v for v in (r.phi_left, r.phi_right) if v is not None]
            return min(values) if values else 1.0

        shown = sorted(self.transferred, key=phi)[:max_rows]
        if shown:
            rest = len(self.transferred) - len(shown)
            lines.append(
                f"The {len(shown)} least similar transferred layers (lowest Φ first"
                + (f"; the other {rest} are in the full report" if rest else "")
                + "):"
            )
        for r in shown:
            kept = "n/a" if r.energy_kept is None else f"{r.energy_kept:.3f}"
            chance = "n/a" if r.chance is None else f"{r.chance:.3f}"
            written = "" if r.written_as is None else f", written as {r.written_as}"
            lines.append(
                f"  {r.key}: {r.method}, Φ={phi(r):.3f} (chance {chance}), energy kept {kept}, rank {r.output_rank}"
                f"{written}"
            )
        return "\n".join(lines)


def json_default(value: object) -> object:
    """``json.dumps(default=...)`` for reports: tuples (shapes) as lists, tensors as nested lists."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def json_safe(value: object) -> object:
    """``value`` with tuples and tensors as lists and every non-finite float as ``None``.

    ``json.dumps`` writes NaN and Infinity as bare tokens that are not JSON (strict parsers,
    browsers and ``jq`` refuse them); reports and tables go through this first and are dumped
    with ``allow_nan=False``.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    return value


@dataclass
class TransferResult:
    """The transferred adapter keyed by *target* model key, and the report."""

    layers: dict[str, LoraFactors]
    report: TransferReport


def flat_shape(shape: Sequence[int]) -> tuple[int, int]:
    """``(out, in·kh·kw)``: the matrix shape of a linear ``(out, in)`` or conv ``(out, in, kh, kw)`` weight.

    The one flattening rule of the package (``linalg.flatten_weight`` reshapes a tensor to it).
    """
    return int(shape[0]), math.prod(int(d) for d in shape[1:])


def shape_problem(layer: AdapterLayer, weight_shape: Sequence[int]) -> str:
    """Why ``layer`` cannot patch a weight of ``weight_shape``, or ``""`` when it fits.

    A LoRA layer fits a linear ``(out, in)`` or conv ``(out, in, kh, kw)`` weight when its
    ``(out_features, in_features)`` equal ``(out, in·kh·kw)``; a LoRA-X layer must match the
    weight's shape exactly.
    """
    if len(weight_shape) not in (2, 4):
        dims = "×".join(str(d) for d in weight_shape) or "a scalar"
        return (
            f"the source weight is {len(weight_shape)}-D ({dims}); only linear (out, in) and conv "
            "(out, in, kh, kw) weights can carry a LoRA"
        )
    if isinstance(layer, LoraFactors):
        if (layer.out_features, layer.in_features) == flat_shape(weight_shape):
            return ""
        mine = f"{layer.out_features}×{layer.in_features}"
    else:
        if tuple(layer.shape) == tuple(weight_shape):
            return ""
        mine = "×".join(str(d) for d in layer.shape)
    theirs = "×".join(str(d) for d in weight_shape)
    return f"shape mismatch: the LoRA layer is {mine} but the source weight is {theirs}"
