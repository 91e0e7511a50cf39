"""Linear-algebra building blocks: conv flattening, top-R singular subspaces, factored re-compression.

Everything here works on *factors* or on one base weight at a time; nothing builds an
``(out, in)`` update matrix. Decompositions always run in float32 (float64 inside the Gram
method), whatever the stored dtype: ``torch.linalg.svd``/``eigh`` have no half-precision
kernels, and fp16/bf16 would lose the small singular values that decide the subspace.

Method choice for :func:`top_subspace` (measured, see ``docs/CORE.md`` and
``benchmarks/svd_methods.py``): the default ``"gram"`` forms the Gram matrix of the smaller
side in float64 and calls ``torch.linalg.eigh``. On 2 CPU cores it reproduced the float64
reference subspace to ~1e-10 at every SD layer shape and was 6–19× faster than float32
``torch.linalg.svd`` on the rectangular layers (1280×5120, 640×2048); fp32 SVD was 1.5–2×
faster only on square 1280×1280 layers. ``torch.svd_lowrank`` is fast but misses 1–30 % of
the top-320 subspace on slowly decaying spectra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .errors import NonFiniteError, OptionError, RankError, ShapeMismatchError

__all__ = [
    "SUBSPACE_VERSION",
    "SVD_METHODS",
    "Subspace",
    "factored_norm",
    "flatten_weight",
    "recompress",
    "top_subspace",
]

SvdMethod = Literal["gram", "svd", "lowrank"]
#: Changes whenever :func:`top_subspace` would return different numbers for the same weight;
#: part of every on-disk cache key, so an upgrade never reuses stale bases.
SUBSPACE_VERSION = "top_subspace-gram32-eigh64-qr-signfix-v2"
SVD_METHODS: tuple[str, ...] = ("gram", "svd", "lowrank")


@dataclass(frozen=True)
class Subspace:
    """The top-R singular triplets of one (flattened) base weight ``W ≈ U·diag(S)·Vᵀ``.

    Attributes:
        U: ``(m, R)`` float32, orthonormal columns (left singular vectors), sign-fixed.
        S: ``(R,)`` float32, singular values in descending order.
        V: ``(n, R)`` float32, orthonormal columns (right singular vectors).

    Tensors live on the device they were computed on.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)`` of the flattened weight."""
        return int(self.U.shape[0]), int(self.V.shape[0])

    def truncate(self, k: int) -> Subspace:
        """The top-``k`` part (views, no copy). ``k`` is clipped to :attr:`rank`."""
        k = min(int(k), self.rank)
        return Subspace(U=self.U[:, :k], S=self.S[:k], V=self.V[:, :k])

    def to(self, device: torch.device | str) -> Subspace:
        """The same subspace on ``device`` (``self`` when it is already there)."""
        target = torch.device(device)
        if all(t.device == target for t in (self.U, self.S, self.V)):
            return self
        return Subspace(U=self.U.to(target), S=self.S.to(target), V=self.V.to(target))


def flatten_weight(w: torch.Tensor) -> torch.Tensor:
    """View a base weight as a matrix.

    Args:
        w: ``(out, in)`` linear or ``(out, in, kh, kw)`` conv weight, any dtype/device.

    Returns:
        ``(out, in·kh·kw)``, a view of ``w`` (same dtype and device).

    Raises:
        ShapeMismatchError: ``w`` is neither 2-D nor 4-D.
    """
    if w.ndim == 2:
        return w
    if w.ndim == 4:
        return w.reshape(w.shape[0], -1)
    raise ShapeMismatchError(
        f"base weight of shape {tuple(w.shape)} is neither linear (out, in) nor conv (out, in, kh, kw); "
        "only Linear and Conv2d layers can carry a LoRA."
    )


def _fix_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Singular vectors are defined up to a joint sign flip of (u_i, v_i); LAPACK, eigh and the
    # GPU kernels choose differently. Make the largest-|.| entry of each u_i positive so that the
    # same weight gives the same basis everywhere (a LoRA-X ΔΣ is only meaningful in that basis).
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U.gather(0, idx.unsqueeze(0))).squeeze(0)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, V * signs


def _gram_eigh(W: torch.Tensor, R: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Eigen-decompose the Gram matrix of the smaller side. The Gram product (the O(m²n) part) runs
    # in float32 and only the d×d eigh in float64: that reproduces the float64 reference subspace
    # to ~1e-6 (the accuracy of a float32 SVD) and was 1.3–1.8× faster than forming it in float64
    # (benchmarks/results/PERF.md). Eigenvalues below ~1e-7·s_max² are rounding noise; they only
    # matter when R covers the whole side, which the QR below makes harmless.
    m, n = W.shape
    wide = m <= n
    G = (W @ W.T if wide else W.T @ W).to(torch.float64)
    evals, evecs = torch.linalg.eigh(G)
    evals = evals.flip(0)[:R].clamp_min(0.0)
    small = evecs.flip(1)[:, :R].to(torch.float32)
    S = evals.sqrt().to(torch.float32)
    # The other side's vectors are W-projected and renormalised: v_i = Wᵀu_i / s_i.
    other = (W.T @ small) if wide else (W @ small)
    # Singular values are sorted, so (numerically) zero ones sit at the end. For them the
    # projection W·u/s is meaningless: complete those columns to an orthonormal set instead
    # (seeded, so the result stays deterministic).
    n_ok = int((S > S[0] * 1e-6).sum()) if R > 0 and float(S[0]) > 0.0 else 0
    other = other[:, :n_ok] / S[:n_ok]
    if n_ok < R:
        gen = torch.Generator(device="cpu").manual_seed(0)
        fill = torch.randn(other.shape[0], R - n_ok, generator=gen, dtype=torch.float32).to(other.device)
        other = torch.cat([other, fill], dim=1)
    # Re-orthonormalise (Householder QR, signs kept): the tail vectors derived from a float32
    # Gram matrix are slightly non-orthogonal, and projectors V·Vᵀ must be exact projectors for
    # the identity properties of the transfer (target = source ⇒ ΔW unchanged).
    q, r = torch.linalg.qr(other.to(torch.float64))
    signs = torch.sign(torch.diagonal(r))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    other = (q * signs).to(torch.float32)
    U, V = (small, other) if wide else (other, small)
    return U, S, V


def top_subspace(
    weight: torch.Tensor,
    rank: int,
    *,
    device: torch.device | str | None = None,
    method: SvdMethod = "gram",
    niter: int = 4,
) -> Subspace:
    """Top-R singular subspaces of a base weight (LoRA-X, arXiv 2501.16559, Eq. 1).

    Args:
        weight: ``(out, in)`` or ``(out, in, kh, kw)``, any float dtype (fp8 is upcast), any device.
            Never modified.
        rank: R; clipped to ``min(out, in·kh·kw)``.
        device: where to compute (default: the weight's device).
        method: ``"gram"`` (default: Gram matrix of the smaller side + float64 ``eigh``),
            ``"svd"`` (float32 ``torch.linalg.svd``, ``full_matrices=False``) or ``"lowrank"``
            (``torch.svd_lowrank`` with ``q = R + 10`` and ``niter`` power iterations; fast but
            approximate). See the module docstring for the measurements behind the default.
        niter: power iterations for ``"lowrank"``.

    Returns:
        A float32 :class:`Subspace` on the compute device, signs fixed so the largest-|.| entry
        of every left singular vector is positive (deterministic across methods and devices).

    Raises:
        RankError: ``rank < 1``.
        OptionError: unknown ``method``.
        ShapeMismatchError: ``weight`` is not 2-D or 4-D.
        NonFiniteError: ``weight`` holds NaN or Inf, or its decomposition overflowed.
    """
    if not isinstance(rank, int) or rank < 1:
        raise RankError(f"subspace rank must be a positive integer (the paper uses 320); got {rank!r}.")
    if method not in SVD_METHODS:
        raise OptionError(f"SVD method {method!r} is not one of {', '.join(SVD_METHODS)}; use 'gram' (default).")
    W = flatten_weight(weight.detach())
    if device is not None:
        W = W.to(device)
    # float32 is the contract for every decomposition (no half-precision LAPACK kernels; fp8 and
    # bf16 have far too few mantissa bits for the small singular values).
    W = W.to(torch.float32)
    m, n = W.shape
    # A NaN would pass through every product and come out as a meaningless basis (and a
    # similarity of min(1.0, nan) = 1.0); values beyond float32's range arrive here as Inf.
    finite = torch.isfinite(W)
    if not bool(finite.all()):
        raise NonFiniteError(
            f"base weight of shape {tuple(weight.shape)} holds {int((~finite).sum())} NaN or Inf values "
            "(or values beyond float32's range); its subspace is undefined. The model file is damaged."
        )
    R = min(rank, m, n)
    try:
        if method == "gram":
            U, S, V = _gram_eigh(W, R)
        elif method == "svd":
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            U, S, V = U[:, :R], S[:R], Vh[:R].T
        else:
            q = min(R + 10, m, n)
            U, S, V = torch.svd_lowrank(W, q=q, niter=niter)
            U, S, V = U[:, :R], S[:R], V[:, :R]
    except torch.linalg.LinAlgError as exc:
        raise _overflow("decomposing a base weight", W, exc) from None
    if not all(bool(torch.isfinite(t).all()) for t in (U, S, V)):
        raise _overflow("decomposing a base weight", W)
    U, V = _fix_signs(U.to(torch.float32), V.to(torch.float32))
    return Subspace(U=U.contiguous(), S=S.to(torch.float32).contiguous(), V=V.contiguous())


def _overflow(what: str, *tensors: torch.Tensor | Exception) -> NonFiniteError:
    """The error for maths that overflowed on finite but implausibly large inputs."""
    sizes = [f"{float(t.abs().max()):.3g}" for t in tensors if isinstance(t, torch.Tensor) and t.numel()]
    cause = next((f" ({t})" for t in tensors if isinstance(t, Exception)), "")
    return NonFiniteError(
        f"{what} overflowed float32 (largest |value| {', '.join(sizes) or 'n/a'}){cause}; such values are not "
        "plausible weights or factors. Check the file."
    )


def factored_norm(up2d: torch.Tensor, down2d: torch.Tensor, scale: float = 1.0) -> float:
    """``‖scale · up @ down‖_F`` from the two small Gram matrices (never the (m, n) product).

    ``‖B A‖²_F = Σ (BᵀB) ∘ (A Aᵀ)``; computed in float64 so that small differences of norms
    (e.g. the energy a method drops) are accurate.

    Args:
        up2d: ``(m, r)``; down2d: ``(r, n)``; any dtype/device.
    """
    if up2d.shape[1] == 0:
        return 0.0
    B = up2d.detach().to(torch.float64)
    A = down2d.detach().to(torch.float64).to(B.device)
    sq = ((B.T @ B) * (A @ A.T)).sum().clamp_min(0.0)
    return abs(float(scale)) * float(sq.sqrt())


def recompress(
    up2d: torch.Tensor, down2d: torch.Tensor, rank: int | None, *, atol: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Re-factor ``up @ down`` at its true rank, or truncated to ``rank``, without forming it.

    QR of both factors (``up = Q_u R_u``, ``downᵀ = Q_d R_d``), then an SVD of the small
    ``R_u R_dᵀ`` core (size ≤ r×r): the best rank-k approximation of ``up @ down`` in Frobenius
    norm (Eckart–Young), as in sd-scripts' ``resize_lora``, at cost O((m+n)r²).

    Numerically zero directions (singular value ≤ ``max(m, n)·eps_fp32·‖up‖₂‖down‖₂``, torch's
    ``matrix_rank`` rule scaled by the factors) are always dropped, so the returned rank is the
    real rank.

    Args:
        up2d: ``(m, r)``; down2d: ``(r, n)``; float32/float64, any device. Not modified.
        rank: the largest rank to keep, or ``None`` for the numerical rank.
        atol: singular values ≤ ``atol`` also count as zero (callers pass a bound relative to
            the update they started from, so a projection that leaves only rounding noise
            yields rank 0).

    Returns:
        ``(up (m, k), down (k, n), energy_kept)``: float32 on the inputs' device, the singular
        values split evenly between the factors (``up = Q·√s``, ``down = √s·Q``);
        ``energy_kept = Σ_{i<k} s_i² / Σ s_i²`` (1.0 for a zero input).

    Raises:
        RankError: ``rank < 1``.
        NonFiniteError: a factor holds NaN or Inf, or the decomposition overflowed.
    """
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise RankError(f"output rank must be a positive integer or None; got {rank!r}.")
    B = up2d.to(torch.float32)
    A = down2d.to(torch.float32)
    m, n = B.shape[0], A.shape[1]
    if B.shape[1] == 0:
        return B.new_zeros(m, 0), A.new_zeros(0, n), 1.0
    if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
        raise _overflow("scaling a layer's factors", up2d, down2d)
    try:
        Qu, Ru = torch.linalg.qr(B)
        Qd, Rd = torch.linalg.qr(A.T)
        P, s, Qh = torch.linalg.svd(Ru @ Rd.T)
    except torch.linalg.LinAlgError as exc:
        raise _overflow("re-compressing a layer's factors", B, A, exc) from None
    if not bool(torch.isfinite(s).all()):
        raise _overflow("re-compressing a layer's factors", B, A)
    total = float((s.double() ** 2).sum())
    if total == 0.0 or float(s[0]) <= atol:
        return B.new_zeros(m, 0), A.new_zeros(0, n), 1.0
    # Relative to the factors' scale, not to s_max: a product that cancels (e.g. two halves of
    # a split that sum to nothing) is numerically zero even though its own s_max is not 0.
    scale = float(torch.linalg.matrix_norm(Ru, ord=2) * torch.linalg.matrix_norm(Rd, ord=2))
    tol = max(max(float(s[0]), scale) * max(m, n) * torch.finfo(torch.float32).eps, float(atol))
    k = int((s > tol).sum())
    if rank is not None:
        k = min(k, rank)
    root = s[:k].sqrt()
    up = (Qu @ P[:, :k]) * root
    down = root[:, None] * (Qh[:k] @ Qd.T)
    kept = float((s[:k].double() ** 2).sum()) / total
    return up.contiguous(), down.contiguous(), min(1.0, kept)
