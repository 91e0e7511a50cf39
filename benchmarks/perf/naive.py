"""The yardstick: a straightforward implementation of the transfer recipe, as a paper script would do it.

Per LoRA layer, every time: build the dense ``ΔW = (alpha/r)·up @ down`` (m×n, float32), run a
full thin ``torch.linalg.svd`` of the source and the target base weight (float32), take the top-R
bases, decide with Φ at the decision rank exactly as the product's rule (LoRA-X Eq. 4 with the
chance-calibrated threshold of ``lorax_core.similarity``), and move ΔW with the ``exact`` method
(the product's ``auto`` choice for standard LoRAs):

    ΔW_t = (P_t P_s + Q_t Q_s) · ΔW · (P'_s P'_t + Q'_s Q'_t),   P = U Uᵀ, Q = I − P,

applied to the dense ΔW through the thin bases (no m×m projector is formed). Both models are
loaded whole with ``safetensors.torch.load_file``, as such a script would.

This is benchmark code only: it deliberately repeats the maths without ``lorax_core`` so that
the comparison checks the product against an independent implementation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Bases", "exact_dense", "naive_transfer"]


@dataclass
class Bases:
    """Top-R singular bases of one layer's source and target weights, float32."""

    Us: torch.Tensor
    Vs: torch.Tensor
    Ut: torch.Tensor
    Vt: torch.Tensor
    passed: bool
    phi: float


def _top(w: torch.Tensor, R: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, _, Vh = torch.linalg.svd(w, full_matrices=False)
    return U[:, :R], Vh[:R].T


def exact_dense(dW: torch.Tensor, b: Bases) -> torch.Tensor:
    """(P_t P_s + Q_t Q_s) ΔW (P'_s P'_t + Q'_s Q'_t) on a dense (m, n) ΔW."""
    par = b.Us @ (b.Us.T @ dW)
    perp = dW - par
    left = b.Ut @ (b.Ut.T @ par) + (perp - b.Ut @ (b.Ut.T @ perp))
    par = (left @ b.Vs) @ b.Vs.T
    perp = left - par
    return (par @ b.Vt) @ b.Vt.T + (perp - (perp @ b.Vt) @ b.Vt.T)


def dense_delta(lora: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """ΔW of one kohya layer, dense float32."""
    up = lora[f"{name}.lora_up.weight"].float()
    down = lora[f"{name}.lora_down.weight"].float()
    alpha = float(lora[f"{name}.alpha"]) if f"{name}.alpha" in lora else float(down.shape[0])
    return (alpha / down.shape[0]) * (up @ down)


def naive_transfer(
    source: Path,
    target: Path,
    lora_path: Path,
    *,
    rank: int = 320,
    threshold: float = 0.5,
    keys: set[str] | None = None,
    sink: Callable[[str, str, torch.Tensor | None, Bases], None] | None = None,
    device: str = "cpu",
) -> dict[str, float]:
    """Transfer every layer of a kohya LoRA naively; hand each result to ``sink`` (untimed).

    Args:
        source, target: diffusion-model safetensors files with the same keys.
        lora_path: a kohya LoRA (``lora_unet_<path>`` names).
        rank: R. threshold: c of τ = chance + c(1 − chance).
        keys: only these model tensor names (a documented subset), or all the LoRA's layers.
        sink: ``sink(model key, layer name, ΔW_t or None if skipped, bases)``; its time is
            excluded from the reported seconds.
        device: where the files are loaded (``load_file(..., device=)``) and everything runs, as
            a naive GPU script would do it.

    Returns:
        ``{"seconds": time excluding the sink, "layers": n, "skipped": n}``.
    """
    from safetensors.torch import load_file

    start = time.perf_counter()
    excluded = 0.0
    src = load_file(str(source), device=device)
    tgt = load_file(str(target), device=device)
    lora = load_file(str(lora_path), device=device)
    index = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in src if k.endswith(".weight")}
    names = sorted({k.split(".", 1)[0] for k in lora})
    done = skipped = 0
    for name in names:
        key = index[name]
        if keys is not None and key not in keys:
            continue
        dW = dense_delta(lora, name)
        Ws, Wt = src[key].float(), tgt[key].float()
        m, n = Ws.shape
        R = min(rank, m, n)
        Us, Vs = _top(Ws, R)
        Ut, Vt = _top(Wt, R)
        d = min(m, n)
        k = max(1, min(R, d, d // 4))
        phi_l = float((Us[:, :k].T @ Ut[:, :k]).pow(2).sum()) / k
        phi_r = float((Vs[:, :k].T @ Vt[:, :k]).pow(2).sum()) / k
        chance = max(k / m, k / n)
        phi = min(phi_l, phi_r)
        bases = Bases(Us, Vs, Ut, Vt, phi >= chance + threshold * (1.0 - chance), phi)
        result = exact_dense(dW, bases) if bases.passed else None
        skipped += result is None
        done += 1
        if sink is not None:
            t = time.perf_counter()
            sink(key, name, result, bases)
            excluded += time.perf_counter() - t
    return {"seconds": time.perf_counter() - start - excluded, "layers": done, "skipped": skipped}
