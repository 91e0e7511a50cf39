"""Time and accuracy of the top-R subspace methods of ``lorax_core.linalg.top_subspace``.

Run (docs/CORE.md lists the numbers and the command they came from; 2 CPU threads):

    PYTHONPATH=. .venv/bin/python benchmarks/svd_methods.py --threads 2 --repeats 5

For every SD layer shape and two synthetic spectra it times each method (best of
``--repeats``, methods interleaved) and measures, against a float64 ``torch.linalg.svd`` reference, the subspace
error ``1 − min(Φ_left, Φ_right)`` of the top-R bases (0 = the same subspace; Φ as in
``lorax_core.similarity.phi``) and the largest relative singular-value error.

Spectra: ``decay`` is W = P·diag(exp(−4 i/d))·Qᵀ with random orthogonal P, Q (a smoothly
decaying spectrum, s_d/s_1 ≈ 0.018); ``gaussian`` is i.i.d. N(0, 1/n) (a Marchenko–Pastur bulk,
the hard case for randomized methods: tiny spectral gaps). Trained SD weights sit between the two.
"""

from __future__ import annotations

import argparse
import time

import torch

from lorax_core.linalg import top_subspace

SHAPES = [(320, 320), (640, 640), (1280, 1280), (1280, 5120), (5120, 1280), (640, 2048), (640, 768)]


def make(m: int, n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn(m, n, generator=gen) / n**0.5
    d = min(m, n)
    P, _ = torch.linalg.qr(torch.randn(m, d, generator=gen, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=torch.float64))
    s = torch.exp(-4.0 * torch.arange(d, dtype=torch.float64) / d)
    return ((P * s) @ Q.T).to(torch.float32)


def gram32(W: torch.Tensor, R: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 Gram + eigh (not offered by the library: shown to justify float64 Gram)."""
    wide = W.shape[0] <= W.shape[1]
    G = W @ W.T if wide else W.T @ W
    e, vec = torch.linalg.eigh(G)
    S = e.flip(0)[:R].clamp_min(0).sqrt()
    small = vec.flip(1)[:, :R]
    other = ((W.T @ small) if wide else (W @ small)) / S.clamp_min(1e-30)
    return (small, S, other) if wide else (other, S, small)


def err(U, S, V, ref) -> tuple[float, float]:
    Ur, Sr, Vr = ref
    R = Ur.shape[1]
    phil = float((U.double().T @ Ur).pow(2).sum()) / R
    phir = float((V.double().T @ Vr).pow(2).sum()) / R
    s_err = float(((S.double() - Sr).abs() / Sr.clamp_min(1e-30)).max())
    return 1.0 - min(phil, phir), s_err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=320)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    methods = {
        "svd fp32": lambda W, R: top_subspace(W, R, method="svd"),
        "gram fp64": lambda W, R: top_subspace(W, R, method="gram"),
        "gram fp32": gram32,
        "lowrank niter=2": lambda W, R: top_subspace(W, R, method="lowrank", niter=2),
        "lowrank niter=4": lambda W, R: top_subspace(W, R, method="lowrank", niter=4),
    }
    print(f"threads={args.threads} R={args.rank} torch={torch.__version__}")
    print("| shape | spectrum | method | time (s) | subspace error 1−Φ | max rel. σ error |")
    print("|---|---|---|---|---|---|")
    for m, n in SHAPES:
        for kind in ("decay", "gaussian"):
            W = make(m, n, kind, gen)
            R = min(args.rank, m, n)
            U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
            ref = (U[:, :R], S[:R], Vh[:R].T)
            # Round-robin over methods and keep each one's best time: on a shared machine the
            # minimum is the least contended run, and interleaving spreads the noise evenly.
            best = dict.fromkeys(methods, float("inf"))
            results = {}
            for _ in range(args.repeats):
                for name, fn in methods.items():
                    t0 = time.perf_counter()
                    results[name] = fn(W, R)
                    best[name] = min(best[name], time.perf_counter() - t0)
            for name, out in results.items():
                Uo, So, Vo = (out.U, out.S, out.V) if hasattr(out, "U") else out
                e_sub, e_s = err(Uo, So, Vo, ref)
                print(f"| {m}×{n} | {kind} | {name} | {best[name]:.3f} | {e_sub:.1e} | {e_s:.1e} |", flush=True)


if __name__ == "__main__":
    main()
