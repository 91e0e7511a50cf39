"""LyCORIS layers (LoHa, LoKr, Tucker LoCon), DoRA and full-difference layers, in factored form.

Every adapter type ComfyUI v0.3.75 applies through ``comfy/weight_adapter`` (and the ``.diff``
patch of ``comfy/lora.py``) is read here into the one form the transfer works on, an exact
``ΔW = scale · up @ down`` on the flattened ``(out, in·kh·kw)`` weight, plus what is needed to
write the layer back in its own type. The identities used (no ``(m, n)`` matrix is formed,
except where the densification note below says so):

* **LoHa** (the low-rank Hadamard product of FedPara, Hyeon-Woo et al., arXiv 2108.06098; LyCORIS ``hada_*``):
  ``ΔW = (w1a w1b) ∘ (w2a w2b)``. The Hadamard product of two products is one product of
  face-splitting (row-wise Khatri–Rao) factors: ``up[i, (k,l)] = w1a[i,k]·w2a[i,l]`` and
  ``down[(k,l), j] = w1b[k,j]·w2b[l,j]``, so ``ΔW = up @ down`` with rank ``r1·r2``.
* **LoKr** (the Kronecker adapter of LyCORIS, Yeh et al., arXiv 2309.14859; ``lokr_*``): ``ΔW = w1 ⊗ w2``. With each
  factor written as a product ``w1 = u1 d1`` and ``w2 = u2 d2`` (its two LoRA halves, or the
  identity on its shorter side for a full block), the mixed-product rule
  ``(u1 d1) ⊗ (u2 d2) = (u1 ⊗ u2)(d1 ⊗ d2)`` gives ``up = u1 ⊗ u2``, ``down = d1 ⊗ d2``.
* **Tucker** conv (``lora_mid``, ``hada_t1/t2``, ``lokr_t2``: a Tucker-2 core over the kernel): the core folds into
  the down half, ``down'[a, (c,h,w)] = Σ_b core[a, b, h, w] · down[b, c]``, which keeps the rank.
* **Full** (``.diff``): the difference itself is the update; it is held as ``up = ΔW``,
  ``down = I`` (or the transpose arrangement on the shorter side) — dense by nature.
* **DoRA** (Liu et al., arXiv 2402.09353, Eq. 5): any of the above with a ``dora_scale``
  magnitude; see :func:`dora_magnitude` for how it is re-derived on the target.

Scales follow ComfyUI exactly: ``alpha / w1b.shape[0]`` for LoHa, ``alpha / dim`` for LoKr with
``dim`` the rank of its last factored block (none: scale 1), ``alpha / rank`` for LoRA/LoCon.

Densification (a factor pair as large as the weight): a LoKr with both blocks full (its rank
``min(a,c)·min(b,d)`` is usually the layer's full rank), a LoHa or LoKr whose factored rank
exceeds ``min(out, in·kh·kw)``, and every ``.diff`` layer. Cost: one ``out × in·kh·kw`` float32
matrix plus a ``min(out, in)²`` identity per such layer, and an ``O(m·n·min(m, n))`` QR when the
transfer re-factors it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .errors import LoraxError
from .formats.keys import (
    ALPHA_SUFFIX,
    DORA_SUFFIX,
    FULL_SUFFIXES,
    LOHA_SUFFIXES,
    LOKR_SUFFIXES,
    MID_SUFFIX,
    PAIR_STYLES,
)
from .linalg import factored_norm
from .quant import nonfinite_count
from .types import LoraFactors, SkipReason, SkipText

__all__ = [
    "LycorisLayer",
    "WrittenLayer",
    "build_lycoris",
    "dora_magnitude",
    "energy_rank",
    "lycoris_tensors",
    "same_update",
    "write_back",
]

_HADA, _LOKR, _FULL = LOHA_SUFFIXES, LOKR_SUFFIXES, FULL_SUFFIXES
#: A transferred update this close to the source's (relative Frobenius) *is* the source's: the
#: exact method with target = source returns ΔW up to the float32 rounding of its projections
#: through subspaces from the (Gram-matrix) SVD, measured at 3–5·10⁻⁵ on the tiny SD1.5 layers.
SAME_RTOL = 2e-4


@dataclass(frozen=True)
class LycorisLayer(LoraFactors):
    """A LyCORIS/DoRA/full layer: its exact update as LoRA factors, and its own tensors.

    ``up``/``down``/``alpha`` are the exact ``ΔW = scale · up @ down`` (2-D, float32: up
    ``(out, K)``, down ``(K, in·kh·kw)``), so every part of the transfer that reads a LoRA reads
    this layer unchanged. The extra fields say how to write it back in its own type.

    Attributes:
        kind: ``loha``, ``lokr``, ``full`` (``.diff``) or ``lora`` (a LoRA/LoCon carrying DoRA).
        parts: the layer's file tensors by suffix (``{".hada_w1_a": …, ".alpha": …}``), written
            back unchanged when the transferred update is the source's; for a transferred
            ``full`` layer, the new ``.diff``. Empty for a LoRA written with a DoRA magnitude.
        dora_scale: DoRA's magnitude vector, shaped as the file has it (``(out, 1[, 1, 1])`` on
            the output axis, ``(1, in[, 1, 1])`` on the input axis), or ``None``.
        densified: whether ``up``/``down`` are as large as the weight (see the module docstring).
        file_dtype: the dtype of the file's tensors (outputs are written in it).
    """

    kind: str = "lora"
    parts: Mapping[str, torch.Tensor] = field(default_factory=dict, compare=False)
    dora_scale: torch.Tensor | None = field(default=None, compare=False)
    densified: bool = False
    file_dtype: torch.dtype = torch.float32


def _matrix(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).reshape(t.shape[0], -1)


def _tucker_down(core: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``down'[a, (c, h, w)] = Σ_b core[a, b, h, w] · down[b, c]``: a Tucker core folded into its down half.

    ``core`` ``(r, r, kh, kw)``, ``down`` ``(r, in[, 1, 1])`` → ``(r, in·kh·kw)`` float32 (ComfyUI's
    ``einsum('i j k l, j r, i p -> p r k l')`` for LoHa/LoKr, and its ``lora_mid`` product for LoCon).
    """
    d = _matrix(down)
    return torch.einsum("abhw,bc->achw", core.to(torch.float32), d).reshape(core.shape[0], -1)


def _eye_product(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full matrix ``w`` ``(p, q)`` as ``u @ d`` with the identity on its shorter side (rank ``min(p, q)``).

    For a LoKr block this is exact and small; for a whole layer (``.diff``, a densified LoKr/LoHa)
    it is the densification the module docstring prices."""
    p, q = w.shape
    if p <= q:
        return torch.eye(p, dtype=w.dtype), w
    return w, torch.eye(q, dtype=w.dtype)


def _check_finite(parts: Mapping[str, torch.Tensor]) -> str:
    for suffix, tensor in sorted(parts.items()):
        if tensor.numel() == 0 or tensor.ndim == 0:
            return f"{suffix.lstrip('.')} has shape {tuple(tensor.shape)}: no values (the file is damaged); not transferable"
        if not tensor.is_floating_point():
            return f"{suffix.lstrip('.')} must be floating point; got {tensor.dtype}; not transferable"
        if nonfinite_count(tensor):  # fp8 factors are checked on a float32 copy
            return f"NaN or Inf values in {suffix.lstrip('.')} (the file is damaged); not transferable"
    return ""


def _alpha(parts: Mapping[str, torch.Tensor]) -> tuple[float | None, str]:
    t = parts.get(ALPHA_SUFFIX)
    if t is None:
        return None, ""
    if t.numel() != 1:
        return None, f"alpha must be a single number; got shape {tuple(t.shape)}"
    value = float(t.reshape(()).to(torch.float32))
    if not math.isfinite(value):
        return None, f"alpha is {value} (NaN or Inf: the file is damaged); not transferable"
    return value, ""


def _shapes(parts: Mapping[str, torch.Tensor], names: tuple[str, ...]) -> str:
    return ", ".join(f"{n.lstrip('.')} {tuple(parts[n].shape)}" for n in names if n in parts)


def _loha(parts: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int] | str:
    """LoHa as ``(up (m, r1·r2), down (r1·r2, n), w1b rank)``, or a reason."""
    need = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b")
    missing = [n.lstrip(".") for n in need if n not in parts]
    if missing:
        return f"incomplete LoHa layer: {', '.join(missing)} missing; not transferable"
    t1, t2 = parts.get(".hada_t1"), parts.get(".hada_t2")
    if (t1 is None) != (t2 is None):
        return "incomplete Tucker LoHa layer: hada_t1 and hada_t2 must both be present; not transferable"
    w1a, w1b, w2a, w2b = (parts[n] for n in need)
    bad = f"malformed LoHa layer ({_shapes(parts, (*need, '.hada_t1', '.hada_t2'))}); not transferable"
    if t1 is not None and t2 is not None:
        # Tucker: hada_w?_a is (r, out), hada_w?_b is (r, in), hada_t? is (r, r, kh, kw).
        if any(t.ndim != 2 for t in (w1a, w1b, w2a, w2b)) or t1.ndim != 4 or t2.ndim != 4:
            return bad
        if t1.shape[:2] != (w1a.shape[0], w1b.shape[0]) or t2.shape[:2] != (w2a.shape[0], w2b.shape[0]):
            return bad
        if w1a.shape[1] != w2a.shape[1] or w1b.shape[1] != w2b.shape[1] or t1.shape[2:] != t2.shape[2:]:
            return bad
        up1, down1 = w1a.to(torch.float32).T, _tucker_down(t1, w1b)
        up2, down2 = w2a.to(torch.float32).T, _tucker_down(t2, w2b)
    else:
        # ComfyUI multiplies them with torch.mm: both halves must be 2-D.
        if any(t.ndim != 2 for t in (w1a, w1b, w2a, w2b)):
            return bad
        if w1a.shape[1] != w1b.shape[0] or w2a.shape[1] != w2b.shape[0]:
            return bad
        if w1a.shape[0] != w2a.shape[0] or w1b.shape[1] != w2b.shape[1]:
            return bad
        up1, down1, up2, down2 = (t.to(torch.float32) for t in (w1a, w1b, w2a, w2b))
    m, n = up1.shape[0], down1.shape[1]
    up = (up1[:, :, None] * up2[:, None, :]).reshape(m, -1)
    down = (down1[:, None, :] * down2[None, :, :]).reshape(-1, n)
    return up, down, int(w1b.shape[0])


def _lokr_block(
    parts: Mapping[str, torch.Tensor], side: str
) -> tuple[torch.Tensor, torch.Tensor, int | None, tuple[int, int]] | str:
    """One LoKr block as ``(u, d, dim, (rows, cols))``: ``dim`` is its LoRA rank (``None`` when full)."""
    full, a, b = parts.get(f".lokr_{side}"), parts.get(f".lokr_{side}_a"), parts.get(f".lokr_{side}_b")
    t = parts.get(".lokr_t2") if side == "w2" else None
    names = (f".lokr_{side}", f".lokr_{side}_a", f".lokr_{side}_b", ".lokr_t2")
    bad = f"malformed LoKr layer ({_shapes(parts, names)}); not transferable"
    if full is not None:
        if a is not None or b is not None:
            return f"LoKr layer has both lokr_{side} and its lokr_{side}_a/_b halves; not transferable"
        if full.ndim not in (2, 4) or (side == "w1" and full.ndim != 2):
            return bad
        u, d = _eye_product(_matrix(full))
        return u, d, None, (int(full.shape[0]), math.prod(int(s) for s in full.shape[1:]))
    if a is None and b is None:
        return f"incomplete LoKr layer: neither lokr_{side} nor lokr_{side}_a/_b is present; not transferable"
    if a is None or b is None:
        missing = f"lokr_{side}_a" if a is None else f"lokr_{side}_b"
        return f"incomplete LoKr layer: {missing} is missing; not transferable"
    if t is not None:
        # Tucker: lokr_w2_a is (r, out₂), lokr_w2_b is (r, in₂), lokr_t2 is (r, r, kh, kw).
        if a.ndim != 2 or b.ndim != 2 or t.ndim != 4 or t.shape[:2] != (a.shape[0], b.shape[0]):
            return bad
        u, d = a.to(torch.float32).T, _tucker_down(t, b)
    else:
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            return bad
        u, d = a.to(torch.float32), b.to(torch.float32)
    return u, d, int(b.shape[0]), (int(u.shape[0]), int(d.shape[1]))


def _lokr(parts: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int | None] | str:
    """LoKr as ``(up, down, dim)`` with ``ΔW = (alpha/dim) · up @ down`` (ComfyUI's scale rule)."""
    if ".lokr_t2" in parts and ".lokr_w2" in parts:
        return "LoKr layer has both lokr_w2 and a Tucker core lokr_t2; not transferable"
    blocks = []
    for side in ("w1", "w2"):
        block = _lokr_block(parts, side)
        if isinstance(block, str):
            return block
        blocks.append(block)
    (u1, d1, dim1, _), (u2, d2, dim2, _) = blocks
    # ComfyUI: dim is w1_b's rank when w1 is factored, then w2_b's when w2 is (the last one wins).
    dim = dim2 if dim2 is not None else dim1
    return torch.kron(u1.contiguous(), u2.contiguous()), torch.kron(d1.contiguous(), d2.contiguous()), dim


MALFORMED, UNSUPPORTED = SkipReason.MALFORMED, SkipReason.UNSUPPORTED


def build_lycoris(layer: str, parts: Mapping[str, torch.Tensor]) -> LycorisLayer | LoraFactors | SkipText | None:
    """Read one layer of a LyCORIS type (see :func:`_build`); a reason comes back as a
    :class:`~lorax_core.types.SkipText` coded ``malformed_layer`` unless it says ``unsupported``."""
    built = _build(layer, parts)
    if isinstance(built, str) and not isinstance(built, SkipText):
        return SkipText(built, MALFORMED)
    return built


def _build(layer: str, parts: Mapping[str, torch.Tensor]) -> LycorisLayer | LoraFactors | str | None:
    """Read one layer of a LyCORIS type, or ``None`` when ``parts`` holds none of their tensors.

    Args:
        layer: the layer's name (for messages only).
        parts: the layer's tensors by suffix, as in the file (any float dtype, CPU).

    Returns:
        a :class:`LycorisLayer` (LoHa, LoKr, ``.diff``, anything with ``dora_scale``), a plain
        :class:`~lorax_core.types.LoraFactors` for a Tucker LoCon layer (its core folded into
        ``down``: an ordinary LoRA of the same rank), or the reason the layer cannot be used
        (reported per layer; never raised, so one damaged layer does not stop the file).
    """
    hada = any(s in parts for s in _HADA)
    lokr = any(s in parts for s in _LOKR)
    full = any(s in parts for s in _FULL)
    mid, dora = MID_SUFFIX in parts, DORA_SUFFIX in parts
    pair = next((s for s in PAIR_STYLES if s.down in parts or s.up in parts), None)
    if not (hada or lokr or full or mid or dora):
        return None
    kinds = [name for name, present in (("LoHa", hada), ("LoKr", lokr), ("full diff", full), ("LoRA", pair)) if present]
    if len(kinds) > 1:
        return f"the layer mixes adapter types ({', '.join(kinds)}); ComfyUI would apply only one; not transferable"
    reason = _check_finite({k: v for k, v in parts.items() if k != ALPHA_SUFFIX})
    if reason:
        return reason
    alpha, reason = _alpha(parts)
    if reason:
        return reason
    dtype = next(t.dtype for k, t in parts.items() if k != ALPHA_SUFFIX)
    dora_scale = parts.get(DORA_SUFFIX)
    if full:
        diff = parts.get(".diff")
        if diff is None:
            return SkipText(
                "bias-only patch (diff_b without diff): a bias has no subspace to transfer; not transferable",
                UNSUPPORTED,
            )
        if dora_scale is not None:
            return SkipText("a full difference (diff) cannot carry a DoRA magnitude; not transferable", UNSUPPORTED)
        if diff.ndim not in (2, 4):
            return f"full difference of shape {tuple(diff.shape)} is not a linear or conv weight; not transferable"
        up, down = _eye_product(_matrix(diff))
        return LycorisLayer(up=up, down=down, kind="full", parts=dict(parts), densified=True, file_dtype=dtype)
    if hada or lokr:
        built = _loha(parts) if hada else _lokr(parts)
        if isinstance(built, str):
            return built
        up, down, dim = built
        scale = 1.0 if alpha is None or dim is None else alpha / dim
        # Factors at least as large as the weight (both LoKr blocks full, or r1·r2 ≥ min(m, n)):
        # the dense product is no larger, and smaller when the rank exceeds min(m, n).
        densified = up.shape[1] >= min(up.shape[0], down.shape[1])
        if up.shape[1] > min(up.shape[0], down.shape[1]):
            up, down = _eye_product(up @ down)
        # LoraFactors.scale is alpha / rank: alpha = scale · K carries ComfyUI's alpha / dim.
        scale_alpha = None if scale == 1.0 else scale * up.shape[1]
        return LycorisLayer(
            up=up, down=down, alpha=scale_alpha, kind="loha" if hada else "lokr", parts=dict(parts),
            dora_scale=dora_scale, densified=densified, file_dtype=dtype,
        )  # fmt: skip
    # A LoRA/LoCon pair with a Tucker mid and/or a DoRA magnitude.
    if pair is None:
        return "DoRA magnitude or Tucker core without its LoRA factors (lora_down/lora_up); not transferable"
    down_t, up_t = parts.get(pair.down), parts.get(pair.up)
    if down_t is None or up_t is None:
        return f"incomplete LoRA layer: {pair.down if down_t is None else pair.up} is missing"
    if mid:
        core = parts[MID_SUFFIX]
        if core.ndim != 4 or down_t.ndim not in (2, 4) or core.shape[:2] != (up_t.shape[1], down_t.shape[0]):
            return (
                f"malformed Tucker LoCon layer ({_shapes(parts, (pair.down, MID_SUFFIX, pair.up))}); not transferable"
            )
        down = _tucker_down(core, down_t)
    else:
        down = _matrix(down_t)
    up = _matrix(up_t)
    if up.shape[1] != down.shape[0] or down.shape[0] == 0:
        return f"malformed LoRA layer ({_shapes(parts, (pair.down, pair.up))}); not transferable"
    if dora_scale is None:
        try:
            return LoraFactors(up=up.to(dtype), down=down.to(dtype), alpha=alpha)
        except LoraxError as exc:
            return str(exc)
    return LycorisLayer(up=up, down=down, alpha=alpha, kind="lora", parts=dict(parts), dora_scale=dora_scale,
                        file_dtype=dtype)  # fmt: skip


def dora_magnitude(dora_scale: torch.Tensor, source_weight: torch.Tensor, target_weight: torch.Tensor) -> torch.Tensor:
    """DoRA's magnitude for the target base weight: ``m_t = m_s ⊙ ‖W_t‖ / ‖W_s‖`` along DoRA's axis.

    DoRA (Liu et al., arXiv 2402.09353, §4.1, Eq. 2 and 5) writes a weight as magnitude times
    direction, ``W' = m · V / ‖V‖``, ``V = W₀ + ΔW``, with ``m`` initialised to ``‖W₀‖`` and then
    trained: the adapter's change is the direction change ``ΔW`` (transferred like a LoRA) and
    the relative magnitude change ``m / ‖W₀‖``. Keeping that ratio on the target base gives the
    formula above. With the target equal to the source it returns ``m_s`` unchanged, and a
    target scaled by ``c`` gets ``c·m_s``.

    The norm axis is ComfyUI's (``comfy/weight_adapter/base.py: weight_decompose``): per output
    row when ``dora_scale.shape[0]`` equals the weight's ``out`` (LyCORIS ``wd_on_out``), else per
    input channel (over the output and kernel axes). On the output axis ComfyUI divides by the
    *base* weight's row norms, so there the patched target weight is exactly
    ``(m_s / ‖W_s‖) ⊙ (W_t + ΔW_t)``: the source's per-row gain applied to the transferred update.

    Args:
        dora_scale: the file's magnitude, ``(out, 1[, 1, 1])`` or ``(1, in[, 1, 1])``.
        source_weight, target_weight: the base weights (same shape), any dtype/device.

    Returns:
        The new magnitude in ``dora_scale``'s shape and dtype, on the CPU.
    """
    ws = source_weight.detach().to(device="cpu", dtype=torch.float64)
    wt = target_weight.detach().to(device="cpu", dtype=torch.float64)
    if dora_scale.shape[0] == ws.shape[0]:
        ns, nt = ws.reshape(ws.shape[0], -1).norm(dim=1), wt.reshape(wt.shape[0], -1).norm(dim=1)
    else:
        ns = ws.transpose(0, 1).reshape(ws.shape[1], -1).norm(dim=1)
        nt = wt.transpose(0, 1).reshape(wt.shape[1], -1).norm(dim=1)
    # A zero row/column of the source has no magnitude to keep a ratio of: keep m_s there.
    ratio = torch.where(ns > 0, nt / ns.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(ns))
    m = dora_scale.detach().to(device="cpu", dtype=torch.float64).reshape(-1) * ratio
    return m.reshape(dora_scale.shape).to(dora_scale.dtype)


def same_update(
    source: LoraFactors, up: torch.Tensor, down: torch.Tensor, *, rtol: float = SAME_RTOL
) -> tuple[bool, float]:
    """Whether ``up @ down`` equals the source layer's update within ``rtol`` (relative, Frobenius).

    Computed as the norm of the rank-``(k + K)`` difference ``[up, −s·up_s] @ [down; down_s]``
    (:func:`~lorax_core.linalg.factored_norm`), never the ``(m, n)`` matrices.

    Returns:
        ``(equal, relative difference)``.
    """
    device = up.device
    s_up = source.up2d().to(device=device, dtype=torch.float32) * source.scale
    s_down = source.down2d().to(device=device, dtype=torch.float32)
    ref = factored_norm(s_up, s_down)
    diff = factored_norm(
        torch.cat([up.reshape(up.shape[0], -1), -s_up], 1), torch.cat([down.reshape(down.shape[0], -1), s_down], 0)
    )
    rel = diff / ref if ref > 0 else diff
    return rel <= rtol, rel


def energy_rank(up: torch.Tensor, energy: float, cap: int | None) -> tuple[int, float]:
    """The smallest rank keeping ``energy`` of a re-factored update's squared Frobenius norm.

    ``up`` must come from :func:`~lorax_core.linalg.recompress` (``up = Q·√s``), so its column
    ``i`` has squared norm ``s_i``, the ``i``-th singular value, in decreasing order.

    Returns:
        ``(k, kept)``: ``k ≤ cap`` columns to keep and the fraction ``Σ_{i<k} s_i² / Σ s_i²`` kept.
    """
    s2 = up.to(torch.float64).pow(2).sum(0).pow(2)
    total = float(s2.sum())
    if total == 0.0:
        return int(up.shape[1]), 1.0
    cum = torch.cumsum(s2, 0) / total
    k = int((cum < energy - 1e-12).sum()) + 1
    k = min(k, int(up.shape[1]), cap if cap is not None else k)
    return k, min(1.0, float(cum[k - 1]))


def lycoris_tensors(name: str, layer: LycorisLayer) -> dict[str, torch.Tensor]:
    """The file tensors of a layer written in its own type: its parts, and its DoRA magnitude."""
    out = {f"{name}{suffix}": tensor for suffix, tensor in layer.parts.items()}
    if layer.dora_scale is not None:
        out[f"{name}{DORA_SUFFIX}"] = layer.dora_scale
    return out


@dataclass(frozen=True)
class WrittenLayer:
    """How a transferred LyCORIS layer is written (:func:`write_back`).

    Attributes:
        layer: the output, in the target weight's layout and the file's dtype.
        written_as: ``loha``, ``lokr``, ``diff``, ``lora`` or ``lora+dora`` (plus ``+dora`` for a
            LoHa/LoKr written in its own type with its magnitude).
        error: relative Frobenius error of the written update against the transferred one
            (truncation to a LoRA; for a layer written with its own tensors, the float32 rounding
            by which the transferred update differed from them; 0 when written exactly).
        energy_kept: fraction of the transferred update's energy the written one keeps.
    """

    layer: LoraFactors
    written_as: str
    error: float
    energy_kept: float


def write_back(
    layer: LycorisLayer,
    up: torch.Tensor,
    down: torch.Tensor,
    *,
    copied: bool,
    restore: Callable[[torch.Tensor, torch.Tensor], LoraFactors],
    magnitude: Callable[[torch.Tensor], torch.Tensor],
    energy: float,
    cap: int | None,
) -> WrittenLayer:
    """Write a transferred LyCORIS layer in its own type where that is exact, else as a LoRA.

    Own type: a layer whose transferred update is its source update (``copied``, or equal within
    fp32 rounding, e.g. target = source) is written with its own tensors; a ``.diff`` layer is
    always written as the transferred ``.diff``; a DoRA LoRA as a LoRA of its exact rank with
    the re-derived magnitude. Otherwise (a LoHa/LoKr whose update the projections changed, which
    is then no longer a Hadamard or Kronecker product) it is written as a standard LoRA of the
    smallest rank keeping ``energy`` of the update's energy, at most ``cap``; the relative
    truncation error is ``√(1 − kept)``.

    Args:
        layer: the source layer.
        up, down: the transferred update, 2-D float32, re-factored by ``recompress`` unless
            ``copied`` (``up = Q·√s``, see :func:`energy_rank`).
        restore: turns 2-D factors into the output layout and dtype (``transfer.restore_layout``).
        magnitude: maps the source DoRA magnitude to the target's (:func:`dora_magnitude`).
        energy, cap: the truncation rule.
    """
    dora = None if layer.dora_scale is None else magnitude(layer.dora_scale)
    suffix = "" if dora is None else "+dora"
    own, moved = (True, 0.0) if copied else same_update(layer, up, down)
    if layer.kind == "full":
        restored = restore(up, down)
        delta = (restored.up2d().to(torch.float32) @ restored.down2d().to(torch.float32)).to(layer.file_dtype)
        shape = tuple(restored.up.shape[:1]) + tuple(restored.down.shape[1:])
        parts = {k: v for k, v in layer.parts.items() if k != ".diff"}
        parts[".diff"] = delta.reshape(shape).contiguous()
        return WrittenLayer(_own(layer, restored, parts, None), "diff", 0.0, 1.0)
    if own:
        parts = {k: v for k, v in layer.parts.items() if k != DORA_SUFFIX}
        return WrittenLayer(_own(layer, restore(up, down), parts, dora), layer.kind + suffix, moved, 1.0)
    kept = 1.0
    if layer.kind != "lora":
        k, kept = energy_rank(up, energy, cap)
        up, down = up[:, :k], down[:k]
    restored = restore(up, down)
    error = math.sqrt(max(0.0, 1.0 - kept))
    if dora is None:
        return WrittenLayer(restored, "lora", error, kept)
    out = LycorisLayer(up=restored.up, down=restored.down, kind="lora", dora_scale=dora, file_dtype=layer.file_dtype)
    return WrittenLayer(out, "lora+dora", error, kept)


def _own(
    layer: LycorisLayer, restored: LoraFactors, parts: dict[str, torch.Tensor], dora: torch.Tensor | None
) -> LycorisLayer:
    return LycorisLayer(
        up=restored.up, down=restored.down, kind=layer.kind, parts=parts, dora_scale=dora,
        densified=layer.densified, file_dtype=layer.file_dtype,
    )  # fmt: skip
