"""Aligned transfer: a target layer with one side in another basis (a re-parameterisation).

Two checkpoints can compute the same function with their hidden units in another order or
basis: attention heads permuted, feed-forward or ResBlock channels shuffled (the permutation
symmetries Git Re-Basin, arXiv 2209.04836, aligns by weight matching). A layer's target weight
is then ``W_t ≈ O W_s`` (hidden units on the output side: ``to_q/to_k/to_v``,
``ff.net.0.proj``, ``in_layers.2``, ``emb_layers.1``) or ``W_t ≈ W_s Oᵀ`` (on the input side:
``to_out.0``, ``ff.net.2``, ``out_layers.3``) with ``O`` orthogonal, while the other side stays
in the residual stream's unchanged basis. Every projection method (LoRA-X Eq. 3, ProLoRA,
``exact``) keeps ΔW's coordinates and so pushes on the wrong hidden units there, and the
similarity gate refuses the layer because one side's subspace moved (Φ ≈ chance on that side).

The side that did not move (the *anchor*) pins the correspondence down. For an output-side
change, with ``W_s = U_s S_s V_sᵀ`` and ``W_t = U_t S_t V_tᵀ`` (top-R), the input subspaces agree
(``V_t ≈ V_s D``, D the diagonal signs of the SVD convention) and the orthogonal Procrustes
problem ``min_Z ‖Z (U_sᵀ W_s) − U_tᵀ W_t‖_F`` over orthogonal ``Z`` (R×R) has the solution

    Z = polar(U_tᵀ W_t W_sᵀ U_s) = polar(S_t V_tᵀ V_s S_s),     polar(C) = P Qᵀ for C = P Σ Qᵀ

(Schönemann 1966), so ``O ≈ U_t Z U_sᵀ`` on the top-R part (``Z = D`` and ``U_t Z U_sᵀ = O P_s``
for an exact re-parameterisation). The input-side case is the transpose,
``Z = polar(S_t U_tᵀ U_s S_s)``. Only R×R matrices are formed.

Choices (measured; numbers in ``docs/CORE.md``):

* **R = min(m, n)**, the layer's whole rank (:func:`align_rank`). When the moved side is the
  smaller one (or the layer is square) its basis is then complete and ``O`` is recovered
  exactly (``U_t Z U_sᵀ = polar(W_t W_sᵀ)``); at R < min(m, n) only the top-R part is.
* **Permutations are recognised.** Hidden units are permuted far more often than rotated (an
  elementwise nonlinearity allows nothing else), and a permutation is defined on *every*
  coordinate, including the part of ΔW outside the weight's row/column space that no
  Procrustes map can place (the moved side of ``ff.net.0.proj``, ``ff.net.2`` and 3×3 conv
  inputs is larger than the layer's rank). Unit j of the source has coordinates
  ``a_j = U_s[j, :R]``; unit i of the target, mapped back, ``b_i = (U_t Z)[i, :R]``; under a
  signed permutation ``b_π(j) = ±a_j``. :func:`estimate_map` matches every source unit to the
  target unit of largest ``|cos(a_j, b_i)|`` and accepts the permutation only if it is
  one-to-one and every matched ``|cos| ≥ MATCH_MIN_COS``; the update is then moved by that
  signed permutation, exactly.
* Otherwise the map is the rotation ``U_t Z U_sᵀ``; the part of ΔW outside the source's top-R
  subspace is *dropped* on a side that fails the similarity test (its target coordinates are
  unknown; mapping it by ``Q_t Q_s`` as ``exact`` does leaves it on the old units, measured
  worse) and mapped by ``Q_t Q_s`` on a side that passes, so target = source returns ΔW.
* The anchor side is left as it is (its basis is the same in both models by assumption).
* Numerically zero singular values (``S ≤ 1e-6·S_max``, the cut of ``linalg._gram_eigh``) carry
  arbitrary basis completions; they are left out of the Procrustes problem.

Limits: one side at a time. A layer with *both* sides re-parameterised at once has no anchor
and stays refused, as do unrelated layers (neither side agrees).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from .errors import OptionError, ShapeMismatchError
from .linalg import Subspace
from .similarity import chance_level, phi, threshold_for
from .types import LoraFactors

__all__ = [
    "MATCH_MIN_COS",
    "SIDES",
    "AlignmentTest",
    "Side",
    "SideMap",
    "align_factors",
    "align_lora",
    "align_rank",
    "alignment_test",
    "estimate_map",
    "polar",
]

Side = Literal["output", "input"]
SIDES: tuple[str, ...] = ("output", "input")

#: Singular values at or below this fraction of the largest are numerical zeros; their vectors
#: are arbitrary completions (``linalg._gram_eigh`` uses the same cut).
ZERO_SV = 1e-6
#: Smallest |cosine| between a source unit's coordinates and its matched target unit's for the
#: map to count as a permutation. On the quality benchmark's permuted-then-fine-tuned target
#: the matched units scored ≥ 0.74 (median ≈ 1.00) and the runners-up ≤ 0.70; a random rotation
#: of d units scores ≈ 1/√d.
MATCH_MIN_COS = 0.5
#: Source units per block when matching units, so the (d × d) cosine table is never held whole.
_MATCH_CHUNK = 1024


def align_rank(out_dim: int, in_dim: int) -> int:
    """The subspace rank the alignment uses: the whole rank ``min(out, in)`` of the layer.

    Procrustes at the full rank recovers ``O`` exactly where the moved side is the smaller one;
    ``linalg.top_subspace`` handles R = min(m, n) (complete bases) exactly, and its Gram
    eigendecomposition is the one the similarity pass already computes.
    """
    return min(int(out_dim), int(in_dim))


def polar(C: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor of a square matrix: ``P Qᵀ`` for ``C = P Σ Qᵀ``.

    The nearest orthogonal matrix to ``C`` in Frobenius norm, and the maximiser of ``tr(Zᵀ C)``
    over orthogonal ``Z`` (the orthogonal Procrustes problem, Schönemann 1966).

    Args:
        C: ``(R, R)``, any float dtype/device (the SVD runs in float64).

    Returns:
        ``(R, R)`` float64 on ``C``'s device.
    """
    P, _, Qh = torch.linalg.svd(C.to(torch.float64))
    return P @ Qh


def _transposed(s: Subspace) -> Subspace:
    # Wᵀ = V S Uᵀ: the input-side problem is the output-side problem of the transposed weight.
    return Subspace(U=s.V, S=s.S, V=s.U)


def _check_shapes(src: Subspace, tgt: Subspace) -> None:
    if src.shape != tgt.shape:
        raise ShapeMismatchError(
            f"alignment needs source and target subspaces of one layer shape; got source "
            f"{src.shape[0]}×{src.shape[1]} and target {tgt.shape[0]}×{tgt.shape[1]}."
        )


def _oriented(src: Subspace, tgt: Subspace, side: str) -> tuple[Subspace, Subspace]:
    """The pair oriented so that ``U`` is the side to align and ``V`` the anchor side."""
    if side not in SIDES:
        raise OptionError(f"alignment side must be 'output' or 'input'; got {side!r}.")
    _check_shapes(src, tgt)
    return (src, tgt) if side == "output" else (_transposed(src), _transposed(tgt))


def _nonzero(s: Subspace) -> int:
    if s.rank == 0 or float(s.S[0]) <= 0.0:
        return 0
    return int((s.S > s.S[0] * ZERO_SV).sum())


@dataclass(frozen=True, eq=False)
class SideMap:
    """The estimated change of basis of one side, ``x_t = O x_s`` for that side's vectors.

    Attributes:
        side: ``"output"`` (rows of W, columns of ``up``) or ``"input"`` (columns of W, rows of
            ``down``).
        Us, Ut: ``(d, k)`` float32 source/target bases of that side (top-k, nonzero singular values).
        Z: ``(k, k)`` float64 Procrustes rotation; ``O ≈ Ut Z Usᵀ`` on the source's top-k subspace.
        index, sign: ``(d,)`` when the map is a signed permutation of the d units (source unit j
            goes to target unit ``index[j]`` with ``sign[j]``), else ``None``.
    """

    side: Side
    Us: torch.Tensor
    Ut: torch.Tensor
    Z: torch.Tensor
    index: torch.Tensor | None = field(default=None)
    sign: torch.Tensor | None = field(default=None)

    @property
    def rank(self) -> int:
        return int(self.Z.shape[0])

    @property
    def is_permutation(self) -> bool:
        return self.index is not None

    def apply(self, X: torch.Tensor, *, keep_complement: bool) -> torch.Tensor:
        """``O X`` for the columns of ``X`` (d, r); never a (d, d) matrix.

        A permutation moves every coordinate. A rotation moves the top-k part,
        ``Ut Z Usᵀ X``, and adds ``Q_t Q_s X`` for the rest when ``keep_complement`` (else drops it).
        """
        if self.index is not None and self.sign is not None:
            out = torch.empty_like(X)
            out[self.index.to(X.device)] = X * self.sign.to(device=X.device, dtype=X.dtype)[:, None]
            return out
        Us, Ut = self.Us.to(device=X.device, dtype=X.dtype), self.Ut.to(device=X.device, dtype=X.dtype)
        coords = Us.T @ X  # (k, r): X's coordinates in the source basis
        out = Ut @ (self.Z.to(device=X.device, dtype=X.dtype) @ coords)
        if keep_complement:
            # Q_t Q_s X: the part outside the source subspace, less what falls in the target's.
            perp = X - Us @ coords
            out = out + perp - Ut @ (Ut.T @ perp)
        return out

    def describe(self) -> str:
        if self.index is not None:
            return f"a permutation of the {int(self.index.shape[0])} {self.side} units"
        return f"a rotation of the top-{self.rank} {self.side} directions"


def _match_units(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A signed permutation with ``b[index[j]] ≈ sign[j]·a[j]``, or ``None`` when there is none.

    Args:
        a: ``(d, k)`` source units' coordinates; b: ``(d, k)`` target units' coordinates in the
            same (source) coordinate system.

    Cost O(d²k), in blocks of ``_MATCH_CHUNK`` source units (no d×d table is held).
    """
    na, nb = a.norm(dim=1), b.norm(dim=1)
    scale = float(torch.maximum(na.max(), nb.max())) if a.numel() else 0.0
    # A unit without coordinates (a dead unit, or one the weight never reads or writes) cannot
    # be placed by the weights; then there is no verifiable permutation.
    if scale == 0.0 or bool((na <= scale * 1e-6).any()) or bool((nb <= scale * 1e-6).any()):
        return None
    ua, ub = a / na[:, None], b / nb[:, None]
    index = torch.empty(a.shape[0], dtype=torch.long, device=a.device)
    cos = torch.empty(a.shape[0], dtype=a.dtype, device=a.device)
    for start in range(0, a.shape[0], _MATCH_CHUNK):
        block = ub @ ua[start : start + _MATCH_CHUNK].T  # (d targets, c sources)
        best = block.abs().argmax(dim=0)
        index[start : start + _MATCH_CHUNK] = best
        cos[start : start + _MATCH_CHUNK] = block.gather(0, best[None, :]).squeeze(0)
    one_to_one = int(torch.unique(index).numel()) == index.numel()
    if not one_to_one or float(cos.abs().min()) < MATCH_MIN_COS:
        return None
    return index, torch.sign(cos)


def estimate_map(src: Subspace, tgt: Subspace, side: Side, *, permutations: bool = True) -> SideMap:
    """The change of basis of ``side`` that carries the source layer to the target layer.

    ``Z = polar(S_t V_tᵀ V_s S_s)`` for ``side="output"`` (the best orthogonal ``Z`` with
    ``Z U_sᵀ W_s ≈ U_tᵀ W_t``), ``polar(S_t U_tᵀ U_s S_s)`` for ``side="input"``; only directions
    with nonzero singular values in *both* weights take part. With ``permutations``, the map
    is replaced by the signed permutation of units it matches, when one is found (module
    docstring).

    Args:
        src, tgt: subspaces of the source and target weight, same flattened shape ``(m, n)``
            (all columns are used; :func:`align_rank` directions for an exact map).
        side: the side whose basis differs.
        permutations: look for a permutation of units (O(d²k) for d units).

    Raises:
        OptionError: unknown side. ShapeMismatchError: the subspaces' shapes differ.
    """
    a, b = _oriented(src, tgt, side)
    k = min(_nonzero(a), _nonzero(b))
    device = a.U.device
    Sa = a.S[:k].to(torch.float64)
    Sb = b.S[:k].to(device=device, dtype=torch.float64)
    anchors = b.V[:, :k].to(device=device, dtype=torch.float64).T @ a.V[:, :k].to(torch.float64)
    Z = polar((Sb[:, None] * anchors) * Sa[None, :])
    Us, Ut = a.U[:, :k].to(torch.float32), b.U[:, :k].to(device=device, dtype=torch.float32)
    units = _match_units(Us, Ut @ Z.to(torch.float32)) if permutations and k > 0 else None
    index, sign = units if units is not None else (None, None)
    return SideMap(side=side, Us=Us, Ut=Ut, Z=Z, index=index, sign=sign)


def align_factors(
    up2d: torch.Tensor,
    down2d: torch.Tensor,
    side_map: SideMap,
    *,
    keep_complement: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move ``ΔW = up @ down`` across a change of basis of one side.

    ``side="output"``: ``up ← O up``, ``down`` unchanged; ``side="input"``: ``downᵀ ← O downᵀ``,
    ``up`` unchanged (:meth:`SideMap.apply`).

    Args:
        up2d: ``(m, r)``; down2d: ``(r, n)``; float32 or float64, on the map's device.
        side_map: from :func:`estimate_map` for this layer.
        keep_complement: for a rotation, map the part outside the source's top-k subspace by
            ``Q_t Q_s`` (``True``) or drop it (``False``); a permutation moves everything.

    Returns:
        ``(up (m, r), down (r, n))`` in the inputs' dtype and device.

    Raises:
        ShapeMismatchError: the factors do not fit the map.
    """
    d = side_map.Us.shape[0]
    width = up2d.shape[0] if side_map.side == "output" else down2d.shape[1]
    if up2d.shape[1] != down2d.shape[0] or width != d:
        raise ShapeMismatchError(
            f"LoRA factors up {tuple(up2d.shape)} and down {tuple(down2d.shape)} do not fit an alignment of "
            f"{d} {side_map.side} units; estimate the map from this layer's base weights."
        )
    if side_map.side == "output":
        return side_map.apply(up2d, keep_complement=keep_complement), down2d.clone()
    return up2d.clone(), side_map.apply(down2d.T, keep_complement=keep_complement).T.contiguous()


@dataclass(frozen=True, eq=False)
class AlignmentTest:
    """Whether a layer looks like a one-sided re-parameterisation of the source layer.

    Attributes:
        side: the side with the lower Φ (the candidate for a change of basis).
        phi_left, phi_right: Φ of the output / input subspaces at the decision rank ``rank``, as
            in :func:`lorax_core.similarity.layer_similarity`.
        phi_aligned: Φ of ``side`` after alignment: ``Φ(U_t[:, :k], O U_s[:, :k])``.
        chance, threshold, rank: as in the similarity test (``rank`` = decision rank k).
        side_map: the estimated map of ``side``.
    """

    side: Side
    phi_left: float
    phi_right: float
    phi_aligned: float
    chance: float
    threshold: float
    rank: int
    side_map: SideMap

    @property
    def phi_anchor(self) -> float:
        """Φ of the other (anchor) side."""
        return self.phi_right if self.side == "output" else self.phi_left

    @property
    def phi_moved(self) -> float:
        """Φ of ``side`` before alignment."""
        return self.phi_left if self.side == "output" else self.phi_right

    @property
    def side_agrees(self) -> bool:
        """``side`` passes the plain similarity test (a rotation then keeps its complement)."""
        return self.phi_moved >= self.threshold

    @property
    def reparameterised(self) -> bool:
        """The anchor side agrees, ``side`` does not, and it agrees after alignment."""
        return self.phi_anchor >= self.threshold > self.phi_moved and self.phi_aligned >= self.threshold

    def describe(self) -> str:
        """One line for the layer report."""
        return (
            f"{self.side} side re-parameterised (Φ={self.phi_moved:.2f}, aligned Φ={self.phi_aligned:.2f}, "
            f"{'input' if self.side == 'output' else 'output'} side Φ={self.phi_anchor:.2f}; "
            f"threshold {self.threshold:.2f})"
        )


def alignment_test(src: Subspace, tgt: Subspace, k: int, c: float = 0.5, *, permutations: bool = True) -> AlignmentTest:
    """Per-side Φ at decision rank ``k``, the map of the lower side, and its aligned Φ.

    The aligned Φ is ``Φ(U_t[:, :k], O U_s[:, :k])`` with ``O`` from :func:`estimate_map`
    estimated on all the subspaces' directions: for a permutation
    ``‖U_t[:, :k]ᵀ Π U_s[:, :k]‖²_F / k``; for a rotation ``‖Z[:k, :k]‖²_F / k`` (the share of the
    source's top-k directions that the map sends into the target's top-k). Chance level and
    threshold are the similarity test's.

    Args:
        src, tgt: subspaces of the source and target weights (same shape), at
            :func:`align_rank` for an exact map; at least ``k`` directions.
        k: decision rank (``similarity.similarity_rank``).
        c: threshold fraction of ``similarity.threshold_for``.
        permutations: passed to :func:`estimate_map`.

    Raises:
        OptionError: ``c`` outside [0, 1]. ShapeMismatchError: the subspaces' shapes differ.
    """
    threshold_for(0.0, c)  # validates c before any decomposition work
    _check_shapes(src, tgt)
    m, n = src.shape
    s, t = src.truncate(k), tgt.truncate(k)
    phi_left, phi_right = phi(s.U, t.U), phi(s.V, t.V)
    side: Side = "output" if phi_left <= phi_right else "input"
    chance = max(chance_level(k, m), chance_level(k, n))
    tau = threshold_for(chance, c)
    side_map = estimate_map(src, tgt, side, permutations=permutations)
    top = min(k, side_map.rank)
    if side_map.is_permutation:
        moved = side_map.apply(side_map.Us[:, :top], keep_complement=False)
        phi_aligned = phi(side_map.Ut[:, :top], moved) if top else 0.0
    else:
        phi_aligned = min(1.0, float(side_map.Z[:top, :top].pow(2).sum()) / top) if top else 0.0
    return AlignmentTest(side, phi_left, phi_right, phi_aligned, chance, tau, k, side_map)


def align_lora(f: LoraFactors, test: AlignmentTest) -> LoraFactors:
    """One standard LoRA layer moved across the change of basis ``test`` found.

    A rotation keeps the complement of the aligned side (``Q_t Q_s``) when that side passes the
    plain similarity test and drops it when it does not (module docstring).

    Args:
        f: the layer (linear or conv shapes, any dtype/device); the scale is folded into ``up``.
        test: the layer's :class:`AlignmentTest`.

    Returns:
        2-D float32 factors on the map's device, ``alpha=None``, rank r.

    Raises:
        ShapeMismatchError: the factors do not fit the map.
    """
    device = test.side_map.Us.device
    up = f.up2d().to(device=device, dtype=torch.float32) * f.scale
    down = f.down2d().to(device=device, dtype=torch.float32)
    up, down = align_factors(up, down, test.side_map, keep_complement=test.side_agrees)
    return LoraFactors(up=up, down=down)
