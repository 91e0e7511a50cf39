"""The Compare LoRA Transfer grid for the quality benchmark's toy world (docs/screenshots/compare_grid_toy.png).

The toy models (benchmarks/quality) are not ComfyUI checkpoints, so the Compare node cannot run on
them; this script makes the same rows with the benchmark's own models, sampler and methods and
draws them with the node's own grid function (nodes/_grid.py ``image_grid``), so the picture shows
what the node shows where the images mean something. World: the benchmark's source base, its
``heavy`` target (a derivative trained long on another look, the "Pony from SDXL" case) and its first
LoRA adapter (rank 8, style ``palette``), at the benchmark's default budgets and seeds. Rows, each
with the same prompts (one class per column) and the same noise:

1. source + LoRA, 2. target without LoRA, 3. target + LoRA loaded directly (``copy``),
4. target + transferred (``auto``), 5. target + refined (data-free, ``effect``, 300 steps).

Run from the repository root (trains the toy models first: about 10 minutes on one CPU thread)::

    .venv/bin/python -m scripts.toy_compare_grid [--out docs/screenshots/compare_grid_toy.png] [--cache DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import torch
from PIL import Image

from benchmarks.quality.distill import Generations
from benchmarks.quality.evaluate import Sampler, merge
from benchmarks.quality.model import Diffusion, TextEncoder
from benchmarks.quality.run import BenchConfig, _adapters, _build_bases, _transfer
from benchmarks.quality.train import train_adapter
from lorax_core.refine import RefineOptions

ROOT = Path(__file__).resolve().parent.parent
TARGET = "heavy"
STYLE = "palette"
REFINE = RefineOptions()  # the Refine node's defaults
COLUMNS = 8  # two prompts per class


def grid_module() -> ModuleType:
    """nodes/_grid.py, loaded by itself: the pack's ``nodes`` package needs ComfyUI to import."""
    spec = importlib.util.spec_from_file_location("lorax_node_grid", ROOT / "nodes" / "_grid.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots" / "compare_grid_toy.png")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "work" / "quality-cache",
                        help="trained toy models (shared with python -m benchmarks.quality, which keeps them)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = BenchConfig(targets=(TARGET,))
    torch.set_num_threads(cfg.threads)
    # The benchmark's order of seeding and construction (benchmarks/quality/run.py ``run``).
    torch.manual_seed(cfg.seed)
    text, diffusion = TextEncoder(cfg.model), Diffusion()
    bases = _build_bases(cfg, text, diffusion, args.cache / cfg.fingerprint())
    source, target = bases["source"], bases[TARGET]
    _, kind, rank = _adapters(cfg)[0]
    lora = train_adapter(source, kind, rank, text, diffusion, STYLE, steps=cfg.adapter_steps,
                         batch=cfg.adapter_batch, lr=cfg.lora_lr, seed=cfg.seed + 10)  # fmt: skip
    transferred = _transfer(lora, source, target, "auto", cfg)
    if transferred is None:
        raise SystemExit("the transfer refused every layer; nothing to compare")
    refined = Generations(source, lora, target, transferred.layers, text, diffusion,
                          replace(cfg.refine, guidance=cfg.guidance)).refine(REFINE)
    sampler = Sampler(text, diffusion, seeds=1, per_seed=COLUMNS, steps=cfg.ddim_steps, guidance=cfg.guidance)
    s_state, t_state = source.state_dict(), target.state_dict()
    runs = [
        ("source + LoRA", source, merge(s_state, lora)),
        ("target, no LoRA", target, t_state),
        ("target + LoRA loaded directly (copy)", target, merge(t_state, lora)),
        ("target + transferred (auto)", target, merge(t_state, transferred.layers)),
        (f"target + refined ({REFINE.objective}, {REFINE.steps} steps)", target, merge(t_state, refined.layers)),
    ]
    rows = [(label, sampler(model, state).clamp(0, 1).permute(0, 2, 3, 1)) for label, model, state in runs]
    title = (f"toy world (benchmarks/quality): LoRA r{rank} '{STYLE}' from source to '{TARGET}'; same prompts "
             f"(columns), noise and sampler ({cfg.ddim_steps} DDIM steps, guidance {cfg.guidance})")
    grid = grid_module().image_grid(rows, title, cell=64)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray((grid[0].numpy() * 255).round().astype("uint8"))
    image.quantize(colors=128).save(args.out, optimize=True)
    logging.info("wrote %s (%d×%d)", args.out, image.width, image.height)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
