"""Worker for the multi-process cache tests (a module of its own so ``spawn`` children can import it)."""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from lorax_core.cache import DiskCache
from lorax_core.linalg import Subspace, top_subspace


def weight_for(key: str, shape: tuple[int, int] = (96, 64)) -> torch.Tensor:
    """A deterministic weight per key, so every process computes the same subspace for it."""
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randn(*shape, generator=gen)


def subspace_for(key: str, rank: int = 16) -> Subspace:
    return top_subspace(weight_for(key), rank)


def hammer(directory: str, keys: list[str], rounds: int, max_bytes: int, barrier: object) -> None:
    """Read-or-compute every key ``rounds`` times, starting together with the other workers.

    Raises (so the process exits non-zero) if any returned subspace is not the expected one.
    """
    torch.set_num_threads(1)
    cache = DiskCache(Path(directory), max_bytes=max_bytes)
    barrier.wait()  # type: ignore[attr-defined]
    for _ in range(rounds):
        for key in keys:
            got = cache.get_or_compute("fp", key, 16, lambda key=key: subspace_for(key))
            want = subspace_for(key)
            # float16 storage: entries are within a few 1e-4 of the float32 values.
            if not torch.allclose(got.U, want.U, atol=2e-3) or not torch.allclose(got.V, want.V, atol=2e-3):
                raise RuntimeError(f"wrong subspace for {key}")
