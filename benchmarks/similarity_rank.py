"""How informative is Φ at decision rank k? Related vs unrelated layers as k/d grows.

Run (numbers in docs/CORE.md came from this exact command):

    PYTHONPATH=. .venv/bin/python benchmarks/similarity_rank.py --threads 2

For square d×d weights with a smoothly decaying spectrum (``exp(−4 i/d)``) it compares the
top-k subspaces of W with those of

* *related* targets ``W + N`` where N is Gaussian noise with ``‖N‖_F = rel·‖W‖_F`` (a stand-in
  for a fine-tune or a distillation that keeps the layer), and
* an *unrelated* target ``P W Qᵀ`` (random orthogonal P, Q: same spectrum, unrelated spaces),

and prints Φ = min(Φ_left, Φ_right), the chance level k/d, and the normalised score
``(Φ − chance)/(1 − chance)`` (what ``threshold_for``'s c is compared against).
"""

from __future__ import annotations

import argparse

import torch

from lorax_core.linalg import top_subspace
from lorax_core.similarity import chance_level, phi


def orth(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dims", type=int, nargs="+", default=[320, 640, 1280])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    fractions = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0)
    print("| d | target | " + " | ".join(f"k=d·{f:g}" for f in fractions) + " |")
    print("|---|---|" + "---|" * len(fractions))
    for d in args.dims:
        s = torch.exp(-4.0 * torch.arange(d, dtype=torch.float32) / d)
        W = (orth(d, gen) * s) @ orth(d, gen).T
        src = top_subspace(W, d)
        targets = {}
        for rel in (0.05, 0.2, 0.5):
            noise = torch.randn(d, d, generator=gen)
            targets[f"W+N, ‖N‖/‖W‖={rel}"] = W + noise * (rel * W.norm() / noise.norm())
        targets["P·W·Qᵀ (unrelated)"] = orth(d, gen) @ W @ orth(d, gen).T
        for name, Wt in targets.items():
            tgt = top_subspace(Wt, d)
            cells = []
            for f in fractions:
                k = max(1, int(d * f))
                value = min(phi(src.U[:, :k], tgt.U[:, :k]), phi(src.V[:, :k], tgt.V[:, :k]))
                chance = chance_level(k, d)
                norm = (value - chance) / (1 - chance) if chance < 1 else float("nan")
                cells.append(f"Φ={value:.3f} / {norm:+.2f}")
            print(f"| {d} | {name} | " + " | ".join(cells) + " |", flush=True)
    print("cells: Φ / normalised (Φ − chance)/(1 − chance); chance = k/d")


if __name__ == "__main__":
    main()
