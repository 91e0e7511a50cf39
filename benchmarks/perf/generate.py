"""Generate full-size SD1.5- and SDXL-shaped model pairs and kohya LoRAs for the perf benchmark.

Everything goes to ``benchmarks/work/perf/<family>/`` (git-ignored) and is regenerated only when
the generator's spec changes (``spec.json`` records it):

* ``source.safetensors`` – every tensor of the UNet (:mod:`benchmarks.perf.shapes`), float16,
  diffusion-model key names (as in ComfyUI's ``models/diffusion_models``).
* ``target.safetensors`` – source plus a fine-tune-like perturbation (a low-rank drift plus
  dense noise, ~3–4 % of each weight's norm), as between SD1.5 and a fine-tune of it.
* ``lora_a.safetensors``, ``lora_b.safetensors`` – rank-32 kohya LoRAs (``lora_unet_…`` with
  ``lora_down``/``lora_up``/``alpha``) on every attention projection and feed-forward layer,
  different seeds. Stored in float32 so that the comparison with the naive reference measures
  the maths, not float16 rounding of the output.
* ``lora_r8.safetensors``, ``lora_r128.safetensors`` (SD1.5 only) – for the rank scaling table.

Weights of the LoRA-patched layers have a realistic decaying spectrum: a power-law head
``s_i ∝ (i + 1)^-0.6`` on half the directions, mixed by Gaussian (not orthogonal) factors so
the spectrum is smooth, over a Marchenko–Pastur noise bulk. Other tensors are Gaussian.
The files are written tensor by tensor (the safetensors layout is streamed), so generation
never holds a whole model in memory.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .shapes import lora_layer_keys, unet_shapes

__all__ = ["GENERATOR_VERSION", "ensure_family", "family_dir", "write_lora", "write_safetensors"]

GENERATOR_VERSION = 1
LORA_RANK = 32
#: Families that also get the rank-8 and rank-128 LoRAs of the scaling table.
SCALING_FAMILIES = ("sd15", "tiny")
_DTYPE_NAMES = {torch.float16: "F16", torch.float32: "F32"}


def family_dir(work: Path, family: str) -> Path:
    return work / "perf" / family


def _gen(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32("|".join(map(str, parts)).encode()))


def write_safetensors(
    paths: list[Path],
    shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    tensors: Iterable[tuple[str, list[torch.Tensor]]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Stream several same-layout safetensors files at once, one tensor of each in memory at a time.

    The header comes from ``shapes``; ``tensors`` yields ``(name, [tensor for each path])`` for
    exactly the keys of ``shapes``, in the same order.
    """
    size = torch.tensor([], dtype=dtype).element_size()
    header: dict[str, object] = {}
    offset = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * size
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    temps = [p.with_suffix(".partial") for p in paths]
    handles = [t.open("wb") for t in temps]
    try:
        for fh in handles:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
        expected = iter(shapes.items())
        for name, parts in tensors:
            want_name, want_shape = next(expected)
            for fh, tensor in zip(handles, parts, strict=True):
                if name != want_name or tuple(tensor.shape) != want_shape:
                    raise RuntimeError(f"generator out of order: {name} {tuple(tensor.shape)}, expected {want_name}")
                fh.write(tensor.to(dtype).contiguous().view(torch.uint8).numpy().tobytes())
    finally:
        for fh in handles:
            fh.close()
    for tmp, path in zip(temps, paths, strict=True):
        tmp.replace(path)


def _spectral(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """A (m, n) weight with a decaying spectrum and a noise floor, Frobenius norm ≈ 0.03·√(mn)."""
    h = max(1, min(m, n) // 2)
    head = (torch.arange(h, dtype=torch.float32) + 1.0) ** -0.6
    left = torch.randn(m, h, generator=gen) * (head / math.sqrt(m))
    w = left @ (torch.randn(h, n, generator=gen) / math.sqrt(n))
    w += torch.randn(m, n, generator=gen) * (0.02 / math.sqrt(n))
    return w * (0.03 * math.sqrt(m * n) / float(w.norm()))


def _finetune(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """w + a low-rank drift (3 % of ‖w‖) + dense noise (2 % of ‖w‖)."""
    m, n = w.shape[0], w[0].numel()
    drift = torch.randn(m, 8, generator=gen) @ torch.randn(8, n, generator=gen)
    noise = torch.randn(m, n, generator=gen)
    norm = float(w.norm())
    return (
        w
        + (0.03 * norm / float(drift.norm())) * drift.view_as(w)
        + (0.02 * norm / float(noise.norm())) * noise.view_as(w)
    )


def _model_pair(family: str, shapes: dict[str, tuple[int, ...]]) -> Iterable[tuple[str, list[torch.Tensor]]]:
    patched = set(lora_layer_keys(shapes))
    for name, shape in shapes.items():
        gen = _gen(family, name)
        if name in patched:
            w = _spectral(shape[0], shape[1], gen)
        elif len(shape) == 1:
            is_norm_scale = (".norm" in name and name.endswith(".weight")) or name.startswith("out.0.w")
            w = float(is_norm_scale) + 0.02 * torch.randn(shape, generator=gen)
        else:
            w = torch.randn(shape, generator=gen) * (0.5 / math.sqrt(max(1, math.prod(shape[1:]))))
        w_t = _finetune(w, gen) if w.ndim > 1 else w + 0.002 * torch.randn(shape, generator=gen)
        yield name, [w, w_t]


def write_model_pair(family: str, source: Path, target: Path, log: Callable[[str], None]) -> None:
    """Write the source and target model files side by side, one tensor of each in memory at a time."""
    shapes = unet_shapes(family)

    def logged() -> Iterable[tuple[str, list[torch.Tensor]]]:
        for i, item in enumerate(_model_pair(family, shapes)):
            if i % 200 == 0:
                log(f"  {family}: tensor {i}/{len(shapes)}")
            yield item

    meta = {"format": "pt", "generator": "lorax-perf"}
    write_safetensors([source, target], shapes, torch.float16, logged(), meta)


def lora_name(model_key: str) -> str:
    """kohya layer name of a diffusion-model tensor name (``a.b.weight`` → ``lora_unet_a_b``)."""
    return "lora_unet_" + model_key[: -len(".weight")].replace(".", "_")


def write_lora(
    path: Path, family: str, keys: list[str], shapes: dict[str, tuple[int, ...]], rank: int, seed: str
) -> None:
    """A kohya LoRA (float32) on ``keys``: ``down`` ~ N(0, 1/in), ``up`` ~ N(0, 0.01²), alpha = rank/2."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for key in keys:
        m, n = shapes[key]
        gen = _gen(family, key, seed, rank)
        name = lora_name(key)
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, n, generator=gen) / math.sqrt(n)
        tensors[f"{name}.lora_up.weight"] = torch.randn(m, rank, generator=gen) * 0.01
        tensors[f"{name}.alpha"] = torch.tensor(rank / 2, dtype=torch.float32)
    save_file(tensors, str(path), metadata={"ss_network_dim": str(rank), "ss_network_module": "networks.lora"})


def ensure_family(work: Path, family: str, log: Callable[[str], None]) -> Path:
    """Generate (or reuse, when the spec matches) one family's model pair and LoRAs; returns its dir."""
    out = family_dir(work, family)
    out.mkdir(parents=True, exist_ok=True)
    spec = {"generator": GENERATOR_VERSION, "family": family, "lora_rank": LORA_RANK}
    stamp = out / "spec.json"
    names = ["source.safetensors", "target.safetensors", "lora_a.safetensors", "lora_b.safetensors"]
    if family in SCALING_FAMILIES:
        names += ["lora_r8.safetensors", "lora_r128.safetensors"]
    if stamp.exists() and json.loads(stamp.read_text()) == spec and all((out / n).exists() for n in names):
        log(f"{family}: reusing generated files in {out}")
        return out
    stamp.unlink(missing_ok=True)
    shapes = unet_shapes(family)
    keys = lora_layer_keys(shapes)
    log(f"{family}: generating {len(shapes)} tensors ({sum(math.prod(s) for s in shapes.values()):,} parameters)")
    write_model_pair(family, out / "source.safetensors", out / "target.safetensors", log)
    write_lora(out / "lora_a.safetensors", family, keys, shapes, LORA_RANK, "a")
    write_lora(out / "lora_b.safetensors", family, keys, shapes, LORA_RANK, "b")
    if family in SCALING_FAMILIES:
        for rank in (8, 128):
            write_lora(out / f"lora_r{rank}.safetensors", family, keys, shapes, rank, "scaling")
    stamp.write_text(json.dumps(spec))
    return out
