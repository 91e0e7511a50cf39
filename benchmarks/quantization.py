"""Subspace quality under quantization: Φ drift and transferred-ΔW error of a quantized target vs its bf16 original.

For each tiny DiT family (``scripts/tiny_dit_families.py``) the target is cast to bf16 (the
reference), then quantized from that bf16 file with the real tools (``scripts/quantize_model.py``:
torch's fp8 casts, ComfyUI's scaled-fp8 layout, the ``gguf`` package's quantizers). The
family's PEFT LoRA is transferred source → target with each, and per LoRA layer:

* ``Φ(bf16, q)``: min(Φ_left, Φ_right) between the top-R subspaces of the bf16 target and of the
  quantized target (1 = the quantization left the subspaces the transfer uses unchanged);
* ``ΔΦ``: Φ(source, quantized target) − Φ(source, bf16 target), the drift of the similarity
  the transfer gates on;
* ``ΔW err``: ‖ΔW_q − ΔW_bf16‖_F / ‖ΔW_bf16‖_F between the transferred updates.

The rank R is a quarter of the layer width (``--rank``, default 32: Wan is 128 wide, SD3.5
"Large" 192): at R = width every projection is the identity and the transfer a copy. Flux
(3072 wide, ≈ 1 min per decomposition on one core) is left out on the CPU.

Run (results/QUANTIZATION.md came from this exact command)::

    PYTHONPATH=. LORAX_COMFYUI=.comfyui .venv/bin/python benchmarks/quantization.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorax_core.cache import MemoryCache
from lorax_core.cli import _comfyui_key_map
from lorax_core.formats import read_lora
from lorax_core.linalg import top_subspace
from lorax_core.modelio import open_model
from lorax_core.pipeline import plan_transfer
from lorax_core.similarity import compute_similarity, phi, similarity_rank
from lorax_core.transfer import transfer_adapter
from lorax_core.types import TransferOptions
from scripts.quantize_model import GGUF_TYPES, quantize_file
from scripts.tiny_dit_families import make_family

ROOT = Path(__file__).resolve().parent.parent
COMFYUI = Path(os.environ.get("LORAX_COMFYUI", ROOT / ".comfyui"))
#: ``fp16`` is the family's original (fp16) target, unquantized: the bf16 cast's own effect, the
#: yardstick for "transfers as well as bf16". (GGUF ``F16``/``BF16`` of a bf16 file are exact.)
KINDS = ("fp16", "fp8_e4m3fn", "fp8_e5m2", "scaled_fp8", *(t for t in GGUF_TYPES if t not in ("BF16", "F16")))
ARCH = {"wan": "wan", "sd35": "sd3"}


def _delta(factors) -> torch.Tensor:
    return factors.up2d().float() @ factors.down2d().float() * factors.scale


def _subspace_phi(a: torch.Tensor, b: torch.Tensor, rank: int) -> float:
    """min(Φ_left, Φ_right) of two weights at the decision rank of ``rank`` (as the transfer gates)."""
    m, n = a.reshape(a.shape[0], -1).shape
    k = similarity_rank(min(rank, m, n), m, n)
    sa, sb = top_subspace(a.float(), k), top_subspace(b.float(), k)
    return min(phi(sa.U, sb.U), phi(sa.V, sb.V))


def measure(family: str, rank: int, work: Path) -> list[dict[str, object]]:
    tiny = make_family(family)
    reference = work / f"{family}_bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(tiny.target)).items()}, str(reference))
    # SD3.5's diffusers names (transformer.transformer_blocks.N.attn.to_q: slices of the fused qkv)
    # resolve only through ComfyUI's key map, as on the command line with --comfyui.
    key_map, convert = _comfyui_key_map(COMFYUI, tiny.source, tiny.loras["peft"])
    lora = read_lora(tiny.loras["peft"], key_transform=convert)
    source = open_model(tiny.source)
    plan = plan_transfer(lora, source, key_map)
    options = TransferOptions(method="exact", rank=rank, force=True)
    cache = MemoryCache()  # the source's (and the bf16 target's) subspaces are computed once for every row

    def run(target_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, float], object]:
        target = open_model(target_path)
        target.add_slices(plan.layers)
        result = transfer_adapter(plan.layers, source, target, options, names=plan.names, cache=cache)
        table = compute_similarity(source, target, [(k, k) for k in plan.layers], rank=rank, cache=cache)
        phis = {e.source_key: float(e.phi) for e in table.entries if e.phi is not None}
        return {k: _delta(f) for k, f in result.layers.items()}, phis, target

    ref_delta, ref_phi, ref_target = run(reference)
    rows = []
    for kind in KINDS:
        path = work / f"{family}_{kind}{'.gguf' if kind in GGUF_TYPES else '.safetensors'}"
        if kind == "fp16":
            path = tiny.target
        else:
            quantize_file(reference, path, kind, ARCH[family])
        delta, phis, target = run(path)
        subspace = [_subspace_phi(ref_target.get(k), target.get(k), rank) for k in plan.layers]
        drift = [abs(phis[k] - ref_phi[k]) for k in plan.layers]
        errors = [float((delta[k] - ref_delta[k]).norm() / ref_delta[k].norm()) for k in ref_delta]
        # How much the transfer onto the bf16 target changes the LoRA at all (context for ΔW err).
        moved = [
            float((ref_delta[k] - _delta(plan.layers[k])).norm() / _delta(plan.layers[k]).norm()) for k in ref_delta
        ]
        rows.append({
            "family": family, "quant": kind, "layers": len(errors), "rank": rank,
            "phi_bf16_vs_quant_min": min(subspace), "phi_bf16_vs_quant_mean": sum(subspace) / len(subspace),
            "phi_drift_mean": sum(drift) / len(drift), "phi_drift_max": max(drift),
            "dw_err_mean": sum(errors) / len(errors), "dw_err_max": max(errors),
            "transfer_change_mean": sum(moved) / len(moved),
            "file_bytes": path.stat().st_size, "bf16_bytes": reference.stat().st_size,
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    head = ("| family | quant | Φ(bf16, q) min / mean | ΔΦ mean / max | ΔW err mean / max | size vs bf16 |\n"
            "|---|---|---|---|---|---|\n")  # fmt: skip
    body = "".join(
        f"| {r['family']} | {r['quant']} | {r['phi_bf16_vs_quant_min']:.4f} / {r['phi_bf16_vs_quant_mean']:.4f} "
        f"| {r['phi_drift_mean']:.4f} / {r['phi_drift_max']:.4f} | {r['dw_err_mean']:.4f} / {r['dw_err_max']:.4f} "
        f"| {r['file_bytes'] / r['bf16_bytes']:.2f} |\n"  # type: ignore[operator]
        for r in rows
    )
    # The same in every row of a family: what the transfer onto the bf16 target changes in the LoRA.
    changes = {r["family"]: r["transfer_change_mean"] for r in rows}
    tail = "".join(f"\n{f}: the transfer itself changes ΔW by {c:.4f} (mean ‖ΔW_bf16 − ΔW_LoRA‖/‖ΔW_LoRA‖)."
                   for f, c in changes.items())  # fmt: skip
    return head + body + tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--family", action="append", choices=list(ARCH), help="default: all")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quantization.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as work:
        for family in args.family or list(ARCH):
            rows.extend(measure(family, args.rank, Path(work)))
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
