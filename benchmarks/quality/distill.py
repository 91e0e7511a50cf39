"""The toy world's host for :mod:`lorax_core.refine`: data-free refinement of a transferred LoRA.

Everything a ComfyUI user has is here too, at toy scale: the source model and its LoRA, the
target model, the prompts (the class labels) and a neutral prompt (the null label). No training
image is used: the probes are the models' own DDIM generations (source + LoRA and target +
transferred LoRA, half each), re-noised at uniform timesteps, as the node does in ComfyUI.

The denoisers are the toy UNet run with ``torch.func.functional_call`` on merged weights
``W + scale · up @ down``; the student reads :class:`lorax_core.refine.TrainableLora`'s
parameters, so gradients reach the LoRA factors only. Float32, CPU.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.func import functional_call

from lorax_core.refine import (
    Probes,
    RefineOptions,
    RefineResult,
    TrainableLora,
    distillation_targets,
    make_probes,
    predict,
    refine,
)
from lorax_core.types import LoraFactors

from . import data
from .evaluate import merge
from .model import Diffusion, TextEncoder, ToyLDM, ddim_sample, to_latent

__all__ = ["DistillConfig", "Refined", "Teacher", "add_refined"]


@dataclass(frozen=True)
class DistillConfig:
    """Budget of the data-free refinement (the probes are shared by every step budget)."""

    generations: int = 32  # per model (teacher and target + transferred LoRA)
    probes: int = 256
    batch: int = 16
    lr: float = 3e-3
    output_weight: float = 0.5  # w of the ``blend`` objective
    ddim_steps: int = 10
    guidance: float = 2.0
    seed: int = 0


@dataclass
class Refined:
    layers: dict[str, LoraFactors]
    result: RefineResult


def _denoiser(model: ToyLDM, state: Mapping[str, torch.Tensor], text: TextEncoder):
    def f(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(state), (x, t, text(cond)))

    return f


@torch.no_grad()
def _generate(model: ToyLDM, state: Mapping[str, torch.Tensor], text: TextEncoder, diffusion: Diffusion,
              count: int, cfg: DistillConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``count`` latents ``(count, 12, 8, 8)`` and their labels; noise seeds differ from the evaluation's (1000+)."""
    m = ToyLDM(model.config, model.depths)
    m.load_state_dict(dict(state))
    m.eval()
    labels = data.balanced_labels(count)
    noise = torch.randn((count, 12, 8, 8), generator=torch.Generator().manual_seed(seed))
    images = ddim_sample(m, diffusion, text, labels, noise, cfg.ddim_steps, cfg.guidance)
    return to_latent(images), labels


class Teacher:
    """The probes and the teacher's predictions for one (source + LoRA, target) pair, computed once.

    Sharing them across objectives and step budgets is what a user gets by re-running the node
    with another budget on the same inputs (and what keeps the benchmark affordable).
    """

    def __init__(self, source: ToyLDM, source_layers: Mapping[str, LoraFactors], target: ToyLDM,
                 start: Mapping[str, LoraFactors], text: TextEncoder, diffusion: Diffusion,
                 cfg: DistillConfig) -> None:  # fmt: skip
        started = time.perf_counter()
        self.text, self.cfg, self.target, self.start = text, cfg, target, dict(start)
        src_lora, tgt_start = merge(source.state_dict(), source_layers), merge(target.state_dict(), start)
        half = cfg.generations
        lat_a, lab_a = _generate(source, src_lora, text, diffusion, half, cfg, 5000 + cfg.seed)
        lat_b, lab_b = _generate(target, tgt_start, text, diffusion, half, cfg, 6000 + cfg.seed)

        def noiser(x0: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            t = torch.randint(0, diffusion.steps, (x0.shape[0],), generator=g)
            return diffusion.add_noise(x0, t, torch.randn(x0.shape, generator=g)), t

        self.probes: Probes = make_probes(torch.cat([lat_a, lat_b]), torch.cat([lab_a, lab_b]), noiser, cfg.probes,
                                          null_cond=text.null_index, seed=cfg.seed)  # fmt: skip
        self.teacher = predict(_denoiser(source, src_lora, text), self.probes, 64)
        self.teacher_base = predict(_denoiser(source, source.state_dict(), text), self.probes, 64)
        self.target_base = predict(_denoiser(target, target.state_dict(), text), self.probes, 64)
        self.seconds = time.perf_counter() - started

    def refine(self, objective: str, steps: int) -> Refined:
        """Refine the starting LoRA for ``steps`` steps with ``objective``; a fresh copy each call."""
        trainable = TrainableLora(self.start)
        base = {k: v.detach() for k, v in self.target.state_dict().items()}
        index = {key: i for i, key in enumerate(trainable.keys)}

        def student(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            state = dict(base)
            for key, i in index.items():
                state[key] = base[key] + trainable.delta(i, base[key].shape)
            return functional_call(self.target, state, (x, t, self.text(cond)))

        targets = distillation_targets(objective, self.teacher, self.teacher_base, self.target_base,
                                       self.cfg.output_weight)  # fmt: skip
        options = RefineOptions(objective=objective, steps=steps, lr=self.cfg.lr, batch=self.cfg.batch,  # type: ignore[arg-type]
                                seed=self.cfg.seed, output_weight=self.cfg.output_weight)  # fmt: skip
        result = refine(list(trainable.parameters()), student, self.probes, targets, options, baseline=self.target_base)
        return Refined(trainable.export(), result)


class _Cell(Protocol):
    def add(self, method: str, layers: Mapping[str, LoraFactors] | None,
            info: Mapping[str, object] | None = None) -> dict[str, object]: ...  # fmt: skip


def add_refined(cell: _Cell, source: ToyLDM, source_layers: Mapping[str, LoraFactors], target: ToyLDM,
                start: Mapping[str, LoraFactors], start_name: str, text: TextEncoder, diffusion: Diffusion,
                runs: Sequence[tuple[str, int]], cfg: DistillConfig) -> None:  # fmt: skip
    """Score ``refine:<objective>@<steps>`` for every run on one benchmark cell (``CellScorer.add``).

    The probes and teacher predictions are built once and shared by the runs; each run starts
    from ``start`` (the ``start_name`` method's layers). The info stored with each score says
    what it cost: ``probe_seconds`` (generations + teacher passes, once per cell) and
    ``seconds`` (that run's optimisation), plus the held-out losses.
    """
    teacher = Teacher(source, source_layers, target, start, text, diffusion, cfg)
    for objective, steps in runs:
        refined = teacher.refine(objective, steps)
        r = refined.result
        cell.add(f"refine:{objective}@{steps}", refined.layers, {
            "refused": False, "layers_transferred": len(refined.layers), "start": start_name, "steps": steps,
            "probe_seconds": round(teacher.seconds, 1), "seconds": r.seconds, "kept": r.kept,
            "holdout_before": r.holdout_before, "holdout_after": r.holdout_after, "holdout_no_lora": r.baseline,
        })  # fmt: skip
