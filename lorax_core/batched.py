"""Batched float32 top-R subspaces of many same-shape base weights (the CUDA path).

:func:`linalg.top_subspace` decomposes one weight at a time with a float64 ``eigh``; on a GPU
that is latency-bound (hundreds of small kernel launches per layer) and float64 runs at
1/32–1/64 of float32 speed on consumer cards. :func:`top_subspaces_batched` stacks the layers
of one shape and does everything in float32 with batched kernels, mostly matrix products:

1. ``G = A·Aᵀ`` of the smaller side ``A`` (``(d, D)``, ``d ≤ D``; ``A = W`` or ``Wᵀ``) and a
   batched float32 ``eigh``: its top ``p = min(d, R + max(R/2, 16))`` eigenvectors ``X`` start
   the iteration. The squaring limits them to ``eps·s₁²/gap`` accuracy, so R alone would not
   do: directions near the R-th mix with the ones beyond (measured ‖ΔP‖_F/√R ≈ 5e-3 on a
   power-law spectrum without the steps below).
2. Two subspace-iteration steps on W itself, ``X ← qr(A·(Aᵀ·X))``, which never form ``G``
   again, so their rounding is relative to ``s₁·s_i`` instead of ``s₁²`` (Halko, Martinsson &
   Tropp 2011, arXiv 0909.4061, Alg. 4.4). Skipped when ``p = d`` (``X`` spans everything).
3. Rayleigh–Ritz on the p-dimensional space: the small core ``B = Xᵀ·A`` (``(p, D)``) gets a
   float32 SVD ``B = P·Σ·Hᵀ`` and ``U = X·P``, ``V = H`` (top R of each). The SVD of B, not an
   ``eigh`` of ``B·Bᵀ``, keeps the near-degenerate directions at the R boundary apart (the
   Gram variant measured ‖ΔP‖_F/√R ≈ 1e-2).

Every layer is then checked (:func:`_check`): relative residuals
``max_i ‖Aᵀu_i − s_i v_i‖/s₁`` and ``max_i ‖A v_i − s_i u_i‖/s₁`` and the orthonormality
errors ``max |UᵀU − I|``, ``max |VᵀV − I|`` must all be ≤ ``tol``, every value finite, and
``s_R > RANK_FLOOR·s₁``. A layer failing any of them is recomputed alone with
:func:`linalg.top_subspace` (the float64-backed path) and counted in :class:`BatchStats`.
The residuals catch a run that went wrong (overflow, no convergence, TF32 products); they
do not bound the error of single vectors inside a cluster of nearly equal singular values,
which no float32 method resolves better than ``eps·s₁/gap``. The rank floor sends zero and
rank-deficient weights (whose trailing basis vectors are rounding noise) to the reference
path, which completes them deterministically.

Measured on the CPU against a float64 ``torch.linalg.svd`` (spectra ``s_i ∝ i^-0.7``, shapes
320×320 to 1280×5120, R ≤ 320, float32 and float16 inputs; table in ``docs/CORE.md``): projector
error ‖UUᵀ − U₀U₀ᵀ‖_F/√R ≤ 1.5e-5 (``top_subspace``: ≤ 2.3e-5) and singular values within
1e-5 relative. Not yet measured on a GPU.

Results carry :data:`BATCHED_VERSION`, distinct from :data:`linalg.SUBSPACE_VERSION`: the two
algorithms agree only to rounding, so cache entries of one are never served for the other.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

from .errors import NonFiniteError, OptionError, RankError, ShapeMismatchError
from .linalg import Subspace, _fix_signs, flatten_weight, top_subspace

__all__ = [
    "BATCHED_VERSION",
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_TOL",
    "RANK_FLOOR",
    "BatchStats",
    "batch_capacity",
    "read_ahead",
    "top_subspaces_batched",
]

#: Names this algorithm in cache keys; changes whenever it would return different numbers.
BATCHED_VERSION = "batched-gram32-eigh32-iter2-rr-svd32-signfix-v1"
#: Bound on the relative residuals and orthonormality errors of a batched layer. Measured on
#: the CPU at ≤ 2.8e-6 (residuals) and ≤ 3.5e-6 (orthonormality, R = 1280) on power-law and
#: Gaussian weights up to 10240×1280; the 6× margin keeps rounding from sending good layers
#: to the slow path.
DEFAULT_TOL = 2e-5
#: ``s_R ≤ RANK_FLOOR·s₁`` counts as rank-deficient: a weight of rank k < R stored in float32
#: has trailing singular values of ≈ 1e-7·s₁ (rounding), whose vectors are arbitrary.
RANK_FLOOR = 1e-5
#: Float32 working set of one batch; one SDXL-sized layer (1280×5120, R = 320) needs ≈ 110 MB.
DEFAULT_MAX_BATCH_BYTES = 512 * 1024**2

# Subspace-iteration steps after the Gram start, and the least oversampling (p − R).
_POWER_ITERS = 2
_MIN_OVERSAMPLE = 16

_T = TypeVar("_T")
_Job = TypeVar("_Job")


@dataclass
class BatchStats:
    """Counters for reports: ``layers`` handed in, ``batches`` run, ``fallbacks`` to ``top_subspace``."""

    layers: int = 0
    batches: int = 0
    fallbacks: int = 0


def _sizes(m: int, n: int, rank: int) -> tuple[int, int, int, int]:
    """``(d, D, R, p)``: smaller and larger side, clipped rank, iterated dimension."""
    d, D = min(m, n), max(m, n)
    R = min(rank, d)
    return d, D, R, min(d, R + max(R // 2, _MIN_OVERSAMPLE))


def batch_capacity(shape: tuple[int, int], rank: int, max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES) -> int:
    """How many ``(m, n)`` layers one batch holds within ``max_batch_bytes`` (at least 1).

    The estimate counts the float32 tensors alive at the peak: the weights, ``G`` with the
    ``eigh`` outputs and workspace (3·d²), the iterates and the core SVD (≈ 4·p·D + 3·d·p) and
    the residual products (2·(d + D)·R). A single layer above the budget still runs, alone.
    """
    m, n = shape
    d, D, R, p = _sizes(m, n, rank)
    per_layer = 4 * (m * n + 3 * d * d + 4 * p * D + 3 * d * p + 2 * (d + D) * R)
    return max(1, int(max_batch_bytes) // per_layer)


def top_subspaces_batched(
    weights: Sequence[torch.Tensor],
    rank: int,
    *,
    device: torch.device | str | None = None,
    tol: float = DEFAULT_TOL,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    stats: BatchStats | None = None,
) -> list[Subspace | NonFiniteError]:
    """Top-R singular subspaces of many same-shape base weights, float32 throughout.

    The algorithm, its accuracy check and the fallback are described in the module docstring;
    the result matches :func:`linalg.top_subspace` to float32 rounding (same clipping of R,
    same sign convention: the largest-|.| entry of every left vector is positive).

    Args:
        weights: ``(out, in)`` or ``(out, in, kh, kw)`` tensors whose flattened shapes are all
            the same ``(m, n)``; any float dtype, any device. They are copied to ``device`` in
            their own dtype and upcast there (half the transfer for fp16/bf16). Not modified.
        rank: R; clipped to ``min(m, n)``.
        device: where to compute (default: the first weight's device).
        tol: bound on the relative residuals and orthonormality errors of each layer.
        max_batch_bytes: float32 working-set budget per batch (:func:`batch_capacity`).
        stats: counters to add this call's layers, batches and fallbacks to.

    Returns:
        One item per weight, in order: a :class:`Subspace` (``U`` ``(m, R)``, ``S`` ``(R,)``,
        ``V`` ``(n, R)``; float32, contiguous, on ``device``) or, for a weight holding NaN or
        Inf (or whose decomposition overflowed), the :class:`NonFiniteError` that
        ``top_subspace`` raises for it. One bad layer never spoils the others; callers raise
        the error when that layer is asked for.

    Raises:
        RankError: ``rank < 1``.
        ShapeMismatchError: a weight is not 2-D or 4-D, or the flattened shapes differ.
        OptionError: ``tol`` or ``max_batch_bytes`` is not positive.
    """
    if not isinstance(rank, int) or rank < 1:
        raise RankError(f"subspace rank must be a positive integer (the paper uses 320); got {rank!r}.")
    if not tol > 0.0:
        raise OptionError(f"batched decomposition tolerance must be positive; got {tol!r}.")
    if not isinstance(max_batch_bytes, int) or max_batch_bytes < 1:
        raise OptionError(f"max_batch_bytes must be a positive integer; got {max_batch_bytes!r}.")
    flats = [flatten_weight(w.detach()) for w in weights]
    if not flats:
        return []
    shapes = {tuple(f.shape) for f in flats}
    if len(shapes) > 1:
        raise ShapeMismatchError(
            f"batched decomposition needs weights of one flattened shape; got {sorted(shapes)}. Group them by shape."
        )
    m, n = flats[0].shape
    target = torch.device(device) if device is not None else flats[0].device
    stats = stats if stats is not None else BatchStats()
    stats.layers += len(flats)
    step = batch_capacity((m, n), rank, max_batch_bytes)
    out: list[Subspace | NonFiniteError] = []
    with _ieee_matmul(target):
        for start in range(0, len(flats), step):
            out.extend(
                _decompose_chunk(flats[start : start + step], weights[start : start + step], rank, target, tol, stats)
            )
    return out


@contextmanager
def _ieee_matmul(device: torch.device) -> Iterator[None]:
    # A host may have allowed TF32 for float32 matrix products (ComfyUI can); TF32 keeps 10
    # mantissa bits, ~1e-3 relative, which would fail every layer's check. The flag is global,
    # so it is restored afterwards (other threads see full precision meanwhile, only slower).
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    # torch ≥ 2.9 refuses to read the legacy flag once the new API has been used, and vice versa.
    name, value = ("fp32_precision", "ieee") if hasattr(matmul, "fp32_precision") else ("allow_tf32", False)
    before = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, before)


def _decompose_chunk(
    flats: Sequence[torch.Tensor],
    originals: Sequence[torch.Tensor],
    rank: int,
    device: torch.device,
    tol: float,
    stats: BatchStats,
) -> list[Subspace | NonFiniteError]:
    """One batch: upload, screen non-finite layers, decompose the rest together, check, fall back."""
    m, n = flats[0].shape
    results: list[Subspace | NonFiniteError | None] = [None] * len(flats)
    stack = torch.empty((len(flats), m, n), dtype=torch.float32, device=device)
    good: list[int] = []
    for i, flat in enumerate(flats):
        slot = stack[len(good)]
        # Copy in the stored dtype, upcast on the device (copy_ converts after the transfer).
        slot.copy_(flat.to(device))
        if bool(torch.isfinite(slot).all()):
            good.append(i)
            continue
        try:  # the reference path raises the error (with its message) for this layer alone
            results[i] = top_subspace(originals[i], rank, device=device)
        except NonFiniteError as exc:
            results[i] = exc
    if good:
        stats.batches += 1
        U, S, V, ok = _batched_svd(stack[: len(good)], rank, tol)
        del stack
        for j, i in enumerate(good):
            if bool(ok[j]):
                u, v = _fix_signs(U[j], V[j])
                results[i] = Subspace(U=u.contiguous(), S=S[j].clone(), V=v.contiguous())
                continue
            stats.fallbacks += 1
            try:
                results[i] = top_subspace(originals[i], rank, device=device)
            except NonFiniteError as exc:
                results[i] = exc
    return [r for r in results if r is not None]


def _batched_svd(
    W: torch.Tensor, rank: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-R triplets of a ``(b, m, n)`` float32 stack: ``U (b, m, R)``, ``S (b, R)``, ``V (b, n, R)``, ``ok (b,)``."""
    _, m, n = W.shape
    wide = m <= n
    A = W if wide else W.transpose(1, 2)  # (b, d, D), d ≤ D; a strided view, no copy
    At = A.transpose(1, 2)
    d, _, R, p = _sizes(m, n, rank)
    _, evecs = torch.linalg.eigh(torch.bmm(A, At))  # ascending eigenvalues
    X = evecs[..., -p:].flip(-1)
    del evecs
    if p < d:
        for _ in range(_POWER_ITERS):
            X = torch.linalg.qr(torch.bmm(A, torch.bmm(At, X))).Q
    P, sigma, Hh = torch.linalg.svd(torch.bmm(X.transpose(1, 2), A), full_matrices=False)
    Ua = torch.bmm(X, P[..., :R])
    Va = Hh[:, :R].transpose(1, 2)
    S = sigma[:, :R]
    del X, P, Hh, sigma
    ok = _check(A, Ua, S, Va, tol)
    return (Ua, S, Va, ok) if wide else (Va, S, Ua, ok)


def _check(A: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, tol: float) -> torch.Tensor:
    """Per-layer acceptance (``(b,)`` bool) of the triplets of ``A`` ``(b, d, D)``; NaN fails every test."""
    R = S.shape[1]
    s1 = S[:, :1]
    left = (torch.bmm(A.transpose(1, 2), U) - V * S[:, None, :]).norm(dim=1) / s1
    right = (torch.bmm(A, V) - U * S[:, None, :]).norm(dim=1) / s1
    eye = torch.eye(R, dtype=U.dtype, device=U.device)
    orth_u = (torch.bmm(U.transpose(1, 2), U) - eye).abs().amax(dim=(1, 2))
    orth_v = (torch.bmm(V.transpose(1, 2), V) - eye).abs().amax(dim=(1, 2))
    # Comparisons written as "≤ tol" so that NaN (0/0 for a zero weight, overflow) fails them.
    return (
        (left.amax(dim=1) <= tol)
        & (right.amax(dim=1) <= tol)
        & (orth_u <= tol)
        & (orth_v <= tol)
        & (S[:, -1] > RANK_FLOOR * S[:, 0])
    )


def read_ahead(jobs: Sequence[_Job], read: Callable[[_Job], _T]) -> Iterator[_T]:
    """``read(job)`` for each job in order, reading the next job in one background thread.

    While the caller works on one result (e.g. a batch on the GPU), the next is being read
    (disk, decompression), so at most three results exist at once: the one in use, one
    waiting and one being read, which bounds host memory. An exception from ``read`` stops the
    reading and is raised here, after the results read before it. Close the generator
    (``contextlib.closing``) when stopping early: the reader then stops after its current job.
    """
    done = object()
    feed: queue.Queue[tuple[_T] | object] = queue.Queue(maxsize=1)
    stop = threading.Event()
    failed: list[BaseException] = []

    def reader() -> None:
        try:
            for job in jobs:
                if stop.is_set():
                    break
                feed.put((read(job),))
        except BaseException as exc:  # handed to the consumer's thread, where it can be handled
            failed.append(exc)
        finally:
            feed.put(done)

    thread = threading.Thread(target=reader, name="lorax-read-ahead", daemon=True)
    thread.start()
    item = feed.get()
    try:
        while isinstance(item, tuple):
            yield item[0]
            item = feed.get()
    finally:
        stop.set()
        while item is not done:  # unblock a reader waiting to hand over a result nobody takes
            item = feed.get()
        thread.join()
    if failed:
        raise failed[0]
