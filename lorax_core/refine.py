"""Data-free refinement of a transferred LoRA: distil the LoRA's effect onto the new base.

Why: a training-free transfer maps the adapter's *weights*; a fine-tuned target computes
something else with them, and no map of the weights can know what (QUALITY.md: on fine-tuned
toy targets every training-free method ends where ``copy`` ends). The two models know: the
source model with its LoRA shows what the LoRA *does*, the target shows what the new base
does. Trans-LoRA (Wang et al., NeurIPS 2024, arXiv 2405.17258) transfers LLM
adapters by distilling the source model + adapter into a target adapter on synthetic data the
models generate themselves. This module does the same for diffusion denoisers, with no
training images: the inputs are the models' own generations, re-noised at random timesteps,
with the user's prompts (plus a neutral prompt).

Starting point: the transferred LoRA (``transfer_adapter``), whose factors are optimised in
place. Objectives (the target ``y`` the student ``S = target + LoRA_t`` regresses to, MSE):

* ``effect`` (a): ``y = T(x) + (L(x) − B(x))`` — the target's own prediction plus the LoRA's
  *effect* on the source (``L`` = source + LoRA, ``B`` = source). Keeps the target's look.
* ``output`` (b): ``y = L(x)`` — the source + LoRA's prediction itself. Matches the source's
  outputs, which can erase the new model's character.
* ``blend``: ``y = L(x) + (1 − w)·(T(x) − B(x))`` with ``w = output_weight`` — between the
  two (``w = 0`` is ``effect``, ``w = 1`` is ``output``): keeps a share ``1 − w`` of what
  the target does differently from the source. In the toy benchmark a heavily drifted target
  got no style at all from ``effect`` while ``output`` overwrote its look (QUALITY.md).

Both reduce to regression onto a per-input target computed once, so a host can run the
teacher models one at a time (:func:`predict`) and never needs two UNets in memory at once.

Keeping the content (``keep_guidance``): with a neutral prompt, every probe ``(x, t, c)`` is
also evaluated under the neutral prompt ``u``, both branches regress to their targets, and a
second term keeps the *target's own* guidance direction:
``λ·‖(S_c − S_u) − (T_c − T_u)‖²`` (``T`` = the bare target). Classifier-free guidance
(Ho & Salimans 2022, arXiv 2207.12598, Eq. 6) draws the prompt's content from exactly that
difference, and the effect objective alone lets the LoRA bend it: in the toy benchmark plain
``effect`` gained style but lost class accuracy; a small ``λ`` keeps it (QUALITY.md).

One job, one call: :func:`distil` runs the whole recipe — probes from the generations, the
teachers' predictions, the regression targets, the optimisation — over the host's denoisers.

Host contract (all host-specific parts are callables; this module imports no host):

* a :class:`Denoiser` ``f(x, t, cond) -> prediction`` with ``x`` the noised latents
  ``(B, C, …)``, ``t`` ``(B,)`` timesteps in the host's own units and ``cond`` ``(B,)`` int64
  indices into the host's list of conditionings; it moves inputs to its own device and
  returns ``(B, C, …)`` in any float dtype. The student denoiser must read the trainable
  factors (``parameters``) in its forward pass (ComfyUI: weight wrappers; a toy model:
  :class:`TrainableLora` with ``torch.func.functional_call``);
* a :class:`Noiser` ``(x0, level, generator) -> (x_t, t)`` that noises each latent at its
  noise ``level`` in [0, 1] (0 = the host's least-noisy timestep, 1 = its noisiest, linear in
  the host's timestep units); the core draws the levels (:func:`noise_levels`), so every host
  probes the same share of its schedule;
* for :func:`distil`, each model as a :data:`Scope`: ``scope(body)`` runs ``body(denoiser)``
  with that model ready (a toy host calls ``body(f)``; ComfyUI loads the model in its guider
  first) and returns what ``body`` returned.

Everything returned is float32 on the CPU; nothing here materialises a dense ``ΔW`` except
inside a student's own forward pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from .errors import LoraxError, OptionError, ShapeMismatchError
from .types import LoraFactors

__all__ = [
    "OBJECTIVES",
    "Denoiser",
    "Noiser",
    "Objective",
    "Probes",
    "RefineOptions",
    "RefineResult",
    "Scope",
    "Teachers",
    "TrainableLora",
    "distil",
    "distillation_targets",
    "factors_like",
    "generation_split",
    "make_probes",
    "noise_levels",
    "predict",
    "refine",
]

Objective = Literal["effect", "output", "blend"]
OBJECTIVES: tuple[str, ...] = ("effect", "output", "blend")


class Denoiser(Protocol):
    """``f(x (B, C, …), t (B,), cond (B,) int64) -> (B, C, …)``: one model's prediction."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor: ...


class Noiser(Protocol):
    """``(x0 (B, C, …), level (B,) in [0, 1], generator) -> (x_t, t (B,))``: the host's forward diffusion.

    ``level`` places each latent's timestep in the host's schedule, linearly in its timestep
    units (0 = least noise, 1 = most); the noise itself is drawn from ``generator``.
    """

    def __call__(self, x0: torch.Tensor, level: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...  # fmt: skip


#: ``scope(body)`` runs ``body(denoiser)`` with one model ready and returns ``body``'s result.
Scope = Callable[[Callable[[Denoiser], Any]], Any]


@dataclass(frozen=True)
class RefineOptions:
    """Knobs of one refinement run (stored in the output's metadata).

    The defaults are the ones the toy benchmark validated on every target (QUALITY.md).

    Attributes:
        objective: ``effect`` (a), ``output`` (b) or ``blend``; see the module docstring.
        output_weight: ``w`` of the ``blend`` objective, in [0, 1] (ignored by the others).
        keep_guidance: ``λ`` of the term keeping the target's own guidance direction, ≥ 0
            (0 = off); needs a neutral prompt (:func:`distil`'s ``null_cond``).
        steps: optimiser steps (0 returns the starting LoRA with its held-out loss).
        lr: Adam learning rate for the factors (warm-up, then cosine decay to 0).
        batch: probes per step and per teacher pass.
        probes: synthetic inputs :func:`distil` draws from the generations.
        holdout: fraction of the probes kept out of training to measure the result.
        seed: seeds the probes, their split and the batch order.
        max_grad_norm: gradient clipping (the first steps on a fresh target can be large).
        target_share: the share of the generations a host makes with the target + transferred
            LoRA; the rest come from the source + LoRA (:func:`generation_split`). 0 (the
            default): every probe shows what the LoRA draws on the model it was trained on, so
            the regression targets carry its whole effect; probes from the target + transferred
            LoRA, where the effect is still weak, diluted it (a tuning run in the toy benchmark,
            512 images per cell: 0 instead of 0.5 raised the style from 0.54× to 0.73× of the
            retrained adapter's for stripes on the heavy-drift target, 0.95× → 1.01× for its
            palette, 0.73× → 0.86× for stripes on the mild fine-tune, and lowered it 0.98× →
            0.87× for that one's palette; 0.25 kept almost none of the gain).
        timestep_bias: where in the noise schedule the probes sit (:func:`noise_levels`): each
            probe's noise level is ``sigmoid(timestep_bias + z)``, ``z ~ N(0, 1)``, the
            logit-normal timestep density of Esser et al. 2024 (SD3, arXiv 2403.03206, §3.1)
            with location ``timestep_bias``: 0 centres the probes on mid-noise, 1.5 puts 93 % of
            them in the noisier half of the schedule (median level 0.82). Why the noisier
            timesteps: there a probe is mostly noise whichever model made its clean latent, so
            the source's generations show the target the inputs its own sampling passes
            through, and those steps decide a sample's layout, colours and first strokes; at
            low noise a probe is the source's picture, which the target never draws. In the toy
            benchmark (QUALITY.md), 1.5 instead of uniform timesteps is a trade: stripes on
            the heavy-drift target 0.41× → 0.79× of the retrained adapter's style (the weakest
            LoRA cell 0.41× → 0.70×), on the fewer-blocks target 0.70× → 0.83×; the LoRAs'
            palettes 0.03–0.12× lower, a LoRA-X palette 0.22× lower; the mean over the
            fine-tuned targets' cells unchanged.
    """

    objective: Objective = "effect"
    output_weight: float = 0.5
    keep_guidance: float = 0.5
    steps: int = 150
    lr: float = 3e-3
    batch: int = 8
    probes: int = 256
    holdout: float = 0.125
    seed: int = 0
    max_grad_norm: float = 1.0
    target_share: float = 0.0
    timestep_bias: float = 1.5

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise OptionError(f"refine objective {self.objective!r} is not one of {', '.join(OBJECTIVES)}; "
                              "use 'effect' (keeps the target's look).")  # fmt: skip
        if not (isinstance(self.output_weight, int | float) and 0.0 <= self.output_weight <= 1.0):
            raise OptionError(f"refine output_weight must be in [0, 1]; got {self.output_weight!r}. "
                              "Try 0.5 (0 = effect matching, 1 = output matching).")  # fmt: skip
        if not (isinstance(self.keep_guidance, int | float) and math.isfinite(self.keep_guidance)
                and self.keep_guidance >= 0):  # fmt: skip
            raise OptionError(f"refine keep_guidance must be a number ≥ 0; got {self.keep_guidance!r}. "
                              "Try 0.5 (0 turns the content-keeping term off).")  # fmt: skip
        if not isinstance(self.steps, int) or self.steps < 0:
            raise OptionError(f"refine steps must be an integer ≥ 0; got {self.steps!r}. Try 150.")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and 0 < self.lr <= 1):
            raise OptionError(f"refine learning rate must be in (0, 1]; got {self.lr!r}. Try 0.003.")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise OptionError(f"refine batch must be a positive integer; got {self.batch!r}. Try 8.")
        if not isinstance(self.probes, int) or self.probes < 8:
            raise OptionError(f"refine probes must be an integer ≥ 8; got {self.probes!r}. Try 256.")
        if not (0 < self.holdout < 1):
            raise OptionError(f"refine holdout must be a fraction in (0, 1); got {self.holdout!r}. Try 0.125.")
        if not (isinstance(self.target_share, int | float) and 0.0 <= self.target_share <= 1.0):
            raise OptionError(f"refine target_share must be in [0, 1]; got {self.target_share!r}. "
                              "Try 0 (every generation by the source with its LoRA).")  # fmt: skip
        if not (isinstance(self.timestep_bias, int | float) and math.isfinite(self.timestep_bias)
                and abs(self.timestep_bias) <= 6):  # fmt: skip
            raise OptionError(f"refine timestep_bias must be a number in [-6, 6]; got {self.timestep_bias!r}. "
                              "Try 1.5 (0 centres the probes on mid-noise, > 0 favours the noisier timesteps).")  # fmt: skip
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise OptionError(f"refine max_grad_norm must be > 0; got {self.max_grad_norm!r}. Try 1.0.")


def generation_split(total: int, options: RefineOptions) -> tuple[int, int]:
    """How many of ``total`` generations each model makes: ``(source + LoRA, target + transferred LoRA)``.

    ``options.target_share`` of them (rounded) by the target + transferred LoRA, the rest by the
    source + LoRA; a share strictly between 0 and 1 gives each model at least one when
    ``total ≥ 2``. Every host splits its generations with this, so the share means the same
    on each.

    Raises:
        OptionError: ``total < 1``.
    """
    if total < 1:
        raise OptionError(f"refine needs at least one generation; got {total}. Give a batch size ≥ 1.")
    start = round(total * options.target_share)
    if 0.0 < options.target_share < 1.0 and total >= 2:
        start = min(max(start, 1), total - 1)
    return total - start, start


def noise_levels(count: int, bias: float, generator: torch.Generator) -> torch.Tensor:
    """``count`` noise levels ``sigmoid(bias + z)``, ``z ~ N(0, 1)``: ``(count,)`` float32 in [0, 1], CPU.

    A level is the position of a timestep between the host's least-noisy (0) and noisiest (1),
    linear in the host's timestep units (:class:`Noiser`). The density is the logit-normal of
    Esser et al. 2024 (arXiv 2403.03206, §3.1) with location ``bias`` and scale 1: its median
    is ``sigmoid(bias)``.
    """
    return torch.sigmoid(bias + torch.randn(count, generator=generator))


@dataclass(frozen=True)
class Probes:
    """Synthetic inputs: ``x`` ``(N, C, …)`` noised latents, ``t`` ``(N,)``, ``cond`` ``(N,)`` int64."""

    x: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, index: torch.Tensor) -> Probes:
        return Probes(self.x[index], self.t[index], self.cond[index])

    def under(self, cond: int) -> Probes:
        """The same inputs, every one under conditioning ``cond`` (the neutral prompt's twin set)."""
        return Probes(self.x, self.t, torch.full_like(self.cond, int(cond)))


@dataclass(frozen=True)
class NullBranch:
    """Every probe's neutral-prompt twin, for :func:`refine`'s content-keeping term.

    Attributes:
        cond: the neutral prompt's conditioning index.
        targets: ``(N, C, …)`` the regression targets of the probes under ``cond``.
        guide: ``(N, C, …)`` the bare target's guidance direction ``T(x, t, c) − T(x, t, cond)``.
        weight: ``λ`` of ``‖(S_c − S_u) − guide‖²`` (``RefineOptions.keep_guidance``).
    """

    cond: int
    targets: torch.Tensor
    guide: torch.Tensor
    weight: float


def make_probes(
    latents: torch.Tensor,
    latent_conds: torch.Tensor,
    noiser: Noiser,
    count: int,
    *,
    null_cond: int | None = None,
    null_fraction: float = 0.25,
    seed: int = 0,
    timestep_bias: float = RefineOptions.timestep_bias,
) -> Probes:
    """Draw ``count`` synthetic inputs from the models' own generations.

    Each probe takes a generated latent at random, noises it with ``noiser`` at a random
    noise level (:func:`noise_levels` with ``timestep_bias``), and pairs it with the prompt it
    was generated from — or, with probability ``null_fraction``, with the neutral prompt
    ``null_cond`` (so that the unconditional branch of classifier-free guidance learns the
    LoRA's effect too).

    Args:
        latents: ``(L, C, …)`` clean latents (any float dtype/device; copied to float32 CPU).
        latent_conds: ``(L,)`` int64: the conditioning index each latent was generated with.
        noiser: the host's forward process.
        count: number of probes N.
        null_cond: index of the neutral prompt, or ``None`` to use only ``latent_conds``.
        null_fraction: share of probes given ``null_cond``.
        seed: seeds the choice of latents, conditionings, timesteps and noise.
        timestep_bias: location of the noise levels' logit-normal density
            (``RefineOptions.timestep_bias``; 0 = centred on mid-noise).

    Returns:
        :class:`Probes` on the CPU, float32.

    Raises:
        OptionError: no latents, ``count < 1``, or mismatched lengths.
    """
    if latents.ndim < 2 or latents.shape[0] == 0:
        raise OptionError(f"refine needs at least one generated latent; got a tensor of shape {tuple(latents.shape)}.")
    if latent_conds.shape != (latents.shape[0],):
        raise OptionError(f"refine: {latents.shape[0]} latents but {tuple(latent_conds.shape)} conditioning indices; "
                          "give one index per latent.")  # fmt: skip
    if count < 1:
        raise OptionError(f"refine needs at least one probe; got count={count}.")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, latents.shape[0], (count,), generator=g)
    x0 = latents.detach().to("cpu", torch.float32)[pick]
    cond = latent_conds.to("cpu", torch.int64)[pick].clone()
    if null_cond is not None and null_fraction > 0:
        cond[torch.rand(count, generator=g) < null_fraction] = int(null_cond)
    xt, t = noiser(x0, noise_levels(count, timestep_bias, g), g)
    return Probes(xt.detach().to("cpu", torch.float32), t.detach().cpu(), cond)


@torch.no_grad()
def predict(
    denoiser: Denoiser, probes: Probes, batch: int = 8, *, check: Callable[[], None] | None = None
) -> torch.Tensor:
    """Run ``denoiser`` over every probe in chunks; returns ``(N, C, …)`` float32 on the CPU.

    ``check()`` is called before each chunk (a host's Cancel raises from it).

    Raises:
        LoraxError: the model returned a non-finite value or a wrongly shaped output.
    """
    outputs = []
    for start in range(0, len(probes), batch):
        if check is not None:
            check()
        part = probes.take(torch.arange(start, min(start + batch, len(probes))))
        out = denoiser(part.x, part.t, part.cond)
        if out.shape != part.x.shape:
            raise ShapeMismatchError(f"refine: the model returned shape {tuple(out.shape)} for inputs of shape "
                                     f"{tuple(part.x.shape)}; the denoiser must return one prediction per input.")  # fmt: skip
        out = out.detach().to("cpu", torch.float32)
        if not torch.isfinite(out).all():
            raise LoraxError("refine: a model returned NaN/Inf on the synthetic inputs; check the models "
                             "(a broken checkpoint or an fp16 overflow: try a float32/bfloat16 model dtype).")  # fmt: skip
        outputs.append(out)
    return torch.cat(outputs)


def distillation_targets(
    objective: str,
    teacher: torch.Tensor,
    teacher_base: torch.Tensor | None = None,
    target_base: torch.Tensor | None = None,
    output_weight: float = 0.5,
) -> torch.Tensor:
    """The regression target ``y`` per probe (all ``(N, C, …)`` from :func:`predict`).

    ``effect``: ``target_base + (teacher − teacher_base)``; ``output``: ``teacher``;
    ``blend``: ``teacher + (1 − output_weight)·(target_base − teacher_base)``.

    Raises:
        OptionError: unknown objective, or ``effect``/``blend`` without both base predictions.
    """
    RefineOptions(objective=objective, output_weight=output_weight)  # type: ignore[arg-type]  # validates
    if objective == "output":
        return teacher
    if teacher_base is None or target_base is None:
        raise OptionError(f"refine objective {objective!r} needs the source model's and the target model's own "
                          "predictions (without the LoRA); give both, or use objective 'output'.")  # fmt: skip
    keep = 1.0 if objective == "effect" else 1.0 - output_weight
    return teacher + keep * (target_base - teacher_base)


@dataclass
class RefineResult:
    """What a refinement did.

    Attributes:
        losses: training loss per step (MSE against the distillation target).
        holdout_before / holdout_after: the loss on the held-out probes with the starting and
            the final factors (``holdout_after`` is the kept result's).
        fit_before / fit_after: the same without the content-keeping term: how far the LoRA's
            effect is from the distillation targets alone (equal to the losses when
            ``keep_guidance`` is 0).
        refined_fit: the fit the refined factors reached, also when they were not kept.
        kept: ``refined``, or ``start`` when the starting factors were restored: the held-out
            loss did not improve, or the fit got worse (the content-keeping term had traded
            away the LoRA's effect; a transfer that already reproduces it is left as it is).
        baseline: held-out MSE of the bare target (no LoRA at all) when the host gave it: the
            scale the two losses above are read against.
        seconds: wall time of the optimisation.
    """

    options: RefineOptions
    losses: list[float] = field(default_factory=list)
    holdout_before: float = float("nan")
    holdout_after: float = float("nan")
    fit_before: float = float("nan")
    fit_after: float = float("nan")
    refined_fit: float = float("nan")
    kept: Literal["refined", "start"] = "refined"
    probes: int = 0
    seconds: float = 0.0
    baseline: float | None = None

    def metadata(self) -> dict[str, str]:
        """Provenance for the output file (``lorax.refine.*`` string values)."""
        o = self.options
        meta = {
            "lorax.refined": "true",
            "lorax.refine.method": "data-free distillation (Trans-LoRA, arXiv 2405.17258) on the models' own samples",
            "lorax.refine.objective": o.objective if o.objective != "blend" else f"blend (output weight {o.output_weight:g})",
            "lorax.refine.keep_guidance": f"{o.keep_guidance:g}",
            "lorax.refine.steps": str(o.steps),
            "lorax.refine.lr": f"{o.lr:g}",
            "lorax.refine.batch": str(o.batch),
            "lorax.refine.seed": str(o.seed),
            "lorax.refine.target_share": f"{o.target_share:g}",
            "lorax.refine.timestep_bias": f"{o.timestep_bias:g}",
            "lorax.refine.probes": str(self.probes),
            "lorax.refine.holdout_loss_before": f"{self.holdout_before:.6g}",
            "lorax.refine.holdout_loss_after": f"{self.holdout_after:.6g}",
            "lorax.refine.holdout_fit_before": f"{self.fit_before:.6g}",
            "lorax.refine.holdout_fit_after": f"{self.fit_after:.6g}",
            "lorax.refine.kept": self.kept,
        }
        if self.baseline is not None:
            meta["lorax.refine.holdout_loss_no_lora"] = f"{self.baseline:.6g}"
        return meta

    def summary(self) -> str:
        """A few lines for a report box."""
        o = self.options
        lines = [
            f"Refined ({o.objective} matching): {len(self.losses)} steps, lr {o.lr:g}, batch {o.batch}, "
            f"{self.probes} synthetic probes, keep_guidance {o.keep_guidance:g}, {self.seconds:.1f} s.",
            f"Held-out loss: {self.holdout_before:.4g} at the start → {self.holdout_after:.4g}"
            + (f" (bare target without the LoRA: {self.baseline:.4g})" if self.baseline is not None else "") + ".",
        ]  # fmt: skip
        if self.kept == "start" and self.refined_fit > self.fit_before:
            lines.append(f"Refining moved the LoRA's effect away from the source + LoRA's (held-out fit "
                         f"{self.fit_before:.4g} → {self.refined_fit:.4g}) to keep the target's guidance, so the "
                         "starting (transferred) LoRA, which already reproduces that effect, was kept.")
        elif self.kept == "start":
            lines.append("The held-out loss did not improve, so the starting (transferred) LoRA was kept.")
        return "\n".join(lines)


def _lr_at(step: int, steps: int, lr: float) -> float:
    # Short linear warm-up (Adam's first moments are noisy), then cosine decay to 0 so the
    # last steps average rather than jump: the same schedule the benchmark trains adapters with.
    warmup = max(1, steps // 20)
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _loss_terms(
    out: torch.Tensor, targets: torch.Tensor, null: NullBranch | None, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """``(fit, guidance)``: the two parts of a batch's refinement loss (their sum is :func:`_loss`).

    ``out`` is ``(B, …)``, or ``(2B, …)`` = prompt then neutral twins with ``null``. ``fit``:
    without ``null`` the MSE to ``targets[index]``, with it the mean of both branches' MSE.
    ``guidance``: the content-keeping term ``λ·MSE(S_c − S_u, guide)`` (module docstring), 0.0
    without ``null`` or when ``λ = 0``.
    """
    if null is None:
        return torch.nn.functional.mse_loss(out, targets[index].to(out.device)), 0.0
    out_c, out_u = out.chunk(2)
    fit = 0.5 * (torch.nn.functional.mse_loss(out_c, targets[index].to(out.device))
                 + torch.nn.functional.mse_loss(out_u, null.targets[index].to(out.device)))  # fmt: skip
    if null.weight == 0:
        return fit, 0.0
    return fit, null.weight * torch.nn.functional.mse_loss(out_c - out_u, null.guide[index].to(out.device))


def _loss(
    out: torch.Tensor, targets: torch.Tensor, null: NullBranch | None, index: torch.Tensor
) -> torch.Tensor:
    """The refinement loss of a batch: fit plus the content-keeping term (:func:`_loss_terms`)."""
    fit, guidance = _loss_terms(out, targets, null, index)
    return fit + guidance


def _run(student: Denoiser, probes: Probes, index: torch.Tensor, null: NullBranch | None) -> torch.Tensor:
    """The student on ``probes[index]`` (and, with ``null``, on their neutral twins in the same batch)."""
    part = probes.take(index)
    if null is None:
        return student(part.x, part.t, part.cond).float()
    x, t = torch.cat([part.x, part.x]), torch.cat([part.t, part.t])
    cond = torch.cat([part.cond, torch.full_like(part.cond, null.cond)])
    return student(x, t, cond).float()


def _heldout(student: Denoiser, probes: Probes, targets: torch.Tensor, null: NullBranch | None,
             index: torch.Tensor, batch: int) -> tuple[float, float]:  # fmt: skip
    """Mean ``(loss, fit)`` over the probes ``index`` (no grad): ``fit`` is the loss without the content-keeping term."""
    total = fit = 0.0
    with torch.no_grad():
        for part in index.split(batch):
            part_fit, guidance = _loss_terms(_run(student, probes, part, null), targets, null, part)
            fit += float(part_fit) * len(part)
            total += float(part_fit + guidance) * len(part)
    count = max(1, len(index))
    return total / count, fit / count


def refine(
    parameters: Sequence[torch.Tensor],
    student: Denoiser,
    probes: Probes,
    targets: torch.Tensor,
    options: RefineOptions,
    *,
    null: NullBranch | None = None,
    baseline: torch.Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
    check: Callable[[], None] | None = None,
) -> RefineResult:
    """Optimise the LoRA factors ``parameters`` (in place) so that ``student(probes) ≈ targets``.

    Args:
        parameters: the trainable factor tensors the student reads (leaf tensors with
            ``requires_grad``; float32 recommended — Adam's updates underflow in fp16).
        student: the target model with the LoRA built from ``parameters``.
        probes: from :func:`make_probes`.
        targets: ``(N, C, …)`` from :func:`distillation_targets`.
        options: see :class:`RefineOptions` (``probes`` and ``keep_guidance`` are :func:`distil`'s;
            here ``null.weight`` is used).
        null: the probes' neutral-prompt twins: each step then runs the student on a batch and
            its twins together and adds the content-keeping term (module docstring).
        baseline: the bare target's predictions ``(N, C, …)`` (optional): reported as the
            held-out loss with no LoRA at all (with ``null``, its twins are ``baseline − guide``).
        progress: ``progress(done, total)`` after each step.
        check: called before each step; a host's Cancel raises from it (the factors are then
            left as they were after the last finished step).

    Returns:
        :class:`RefineResult`. When the held-out loss at the end is not below the starting one,
        the starting factors are restored (``kept='start'``): refining never makes the LoRA
        worse on probes it did not train on.

    Raises:
        OptionError: no parameters, or probes/targets that do not belong together.
        LoraxError: the loss became NaN/Inf (the starting factors are restored first).
    """
    params = list(parameters)
    if not params:
        raise OptionError("refine: the LoRA has no trainable factors (no layer was transferred); transfer it first.")
    if any(not p.requires_grad or not p.is_leaf for p in params):
        raise OptionError("refine: every factor must be a leaf tensor with requires_grad=True.")
    for name, tensor in (("targets", targets), *(() if null is None else (("null.targets", null.targets),
                                                                           ("null.guide", null.guide)))):  # fmt: skip
        if tensor.shape != probes.x.shape:
            raise ShapeMismatchError(f"refine: {name} of shape {tuple(tensor.shape)} do not match probes of shape "
                                     f"{tuple(probes.x.shape)}; compute them with predict() on the same probes.")  # fmt: skip
    n = len(probes)
    n_hold = max(1, round(n * options.holdout))
    if n - n_hold < 1:
        raise OptionError(f"refine needs more probes than the held-out share: {n} probes, {n_hold} held out; "
                          "use at least 8 probes.")  # fmt: skip
    g = torch.Generator().manual_seed(options.seed)
    order = torch.randperm(n, generator=g)
    hold_idx, train_idx = order[:n_hold], order[n_hold:]

    start_values = [p.detach().clone() for p in params]

    def restore() -> None:
        with torch.no_grad():
            for p, v in zip(params, start_values, strict=True):
                p.copy_(v)

    result = RefineResult(options=options, probes=n)
    result.holdout_before, result.fit_before = _heldout(student, probes, targets, null, hold_idx, options.batch)
    if baseline is not None:
        bare = baseline[hold_idx] if null is None else torch.cat([baseline[hold_idx],
                                                                  (baseline - null.guide)[hold_idx]])  # fmt: skip
        result.baseline = float(_loss(bare, targets, null, hold_idx))
    opt = torch.optim.Adam(params, lr=options.lr)
    started = time.perf_counter()
    for step in range(options.steps):
        if check is not None:
            check()
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, options.steps, options.lr)
        idx = train_idx[torch.randint(0, len(train_idx), (min(options.batch, len(train_idx)),), generator=g)]
        loss = _loss(_run(student, probes, idx, null), targets, null, idx)
        if not torch.isfinite(loss):
            restore()
            raise LoraxError(f"refine: the loss became {float(loss.detach())} at step {step + 1}; the starting LoRA was "
                             f"kept. Lower the learning rate (lr={options.lr:g}) or use a float32 model.")  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
        opt.step()
        result.losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, options.steps)
    result.seconds = round(time.perf_counter() - started, 3)
    after, fit = _heldout(student, probes, targets, null, hold_idx, options.batch)
    result.refined_fit = fit
    # The content-keeping term is a regulariser, not the goal: a run that lowered the total loss
    # by moving the LoRA's effect *away* from the teacher's (fit worse) traded the effect for it.
    # In the toy benchmark that turned a transfer already at the retrained adapter's style into
    # one at 0.71× of it (a re-parameterised copy of the source, where the transfer is already right).
    if (not (after < result.holdout_before) or fit > result.fit_before
            or not all(bool(torch.isfinite(p).all()) for p in params)):  # fmt: skip
        restore()
        result.kept = "start"
        after, fit = result.holdout_before, result.fit_before
    result.holdout_after, result.fit_after = after, fit
    return result


@dataclass(frozen=True)
class Teachers:
    """The three bare or LoRA'd models whose predictions make the regression targets.

    Attributes:
        teacher: the source model with the source LoRA (``L``).
        teacher_base: the source model alone (``B``); ``None`` is allowed for ``output``, which
            does not need it.
        target_base: the target model alone (``T``).
    """

    teacher: Scope
    teacher_base: Scope | None
    target_base: Scope


def distil(
    parameters: Sequence[torch.Tensor],
    student: Scope,
    teachers: Teachers,
    latents: torch.Tensor,
    latent_conds: torch.Tensor,
    noiser: Noiser,
    options: RefineOptions,
    *,
    null_cond: int | None,
    progress: Callable[[int, int], None] | None = None,
    check: Callable[[], None] | None = None,
) -> RefineResult:
    """The whole data-free refinement: probes → teacher predictions → targets → optimisation.

    Every host (the ComfyUI node, the toy benchmark, the tests) calls this one function, so a
    step added to the recipe is added once.

    1. ``options.probes`` probes from the generations (:func:`make_probes`, seeded by
       ``options.seed``, at noise levels drawn with ``options.timestep_bias``). With a
       neutral prompt every probe gets a neutral twin (same ``x``, ``t``) instead of a share
       of neutral probes.
    2. The teachers' predictions, one model at a time (only one needs to be loaded at once),
       on the probes and their twins, in chunks of ``options.batch``.
    3. The regression targets (:func:`distillation_targets`) and, with a neutral prompt, the
       bare target's guidance direction for the content-keeping term (``keep_guidance``).
    4. :func:`refine` of ``parameters`` inside ``student``'s scope.

    Args:
        parameters: the LoRA factors the student reads (updated in place).
        student: scope of the target with the trainable LoRA.
        teachers: scopes of the source + LoRA, the source, the target.
        latents: ``(L, C, …)`` the models' own generations (clean latents, any dtype/device).
        latent_conds: ``(L,)`` int64 prompt index of each generation.
        noiser: the host's forward process.
        options: see :class:`RefineOptions`.
        null_cond: the neutral prompt's conditioning index, or ``None`` (then ``keep_guidance``
            must be 0).
        progress: ``progress(done, total)`` after each prediction chunk and each step.
        check: called before each chunk and step; a host's Cancel raises from it.

    Returns:
        :class:`RefineResult`; ``parameters`` hold the refined (or, when it did not help on
        held-out probes, the starting) factors.

    Raises:
        OptionError: ``keep_guidance > 0`` without a neutral prompt, or inputs that do not fit.
        LoraxError: a model returned NaN/Inf, or the loss diverged.
    """
    paired = null_cond is not None
    if options.keep_guidance > 0 and not paired:
        raise OptionError(f"refine keep_guidance={options.keep_guidance:g} needs a neutral prompt (an empty prompt's "
                          "conditioning); give one, or set keep_guidance to 0.")  # fmt: skip
    if options.objective != "output" and teachers.teacher_base is None:
        raise OptionError(f"refine objective {options.objective!r} needs the source model without its LoRA; "
                          "give it, or use objective 'output'.")  # fmt: skip
    probes = make_probes(latents, latent_conds, noiser, options.probes, null_cond=null_cond,
                         null_fraction=0.0 if paired else 0.25, seed=options.seed,
                         timestep_bias=options.timestep_bias)  # fmt: skip
    inputs = probes if null_cond is None else _concat(probes, probes.under(null_cond))
    scopes = [teachers.teacher, teachers.target_base]
    if options.objective != "output":
        scopes.insert(1, teachers.teacher_base)  # type: ignore[arg-type]
    predicting = len(scopes) * math.ceil(len(inputs) / options.batch)
    total = predicting + options.steps
    chunks = 0

    def chunk() -> None:  # before each prediction chunk
        nonlocal chunks
        if check is not None:
            check()
        chunks += 1
        if progress is not None:
            progress(chunks, total)

    def stepped(step: int, steps: int) -> None:
        if progress is not None:
            progress(predicting + step, total)

    outputs = [scope(lambda f: predict(f, inputs, options.batch, check=chunk)) for scope in scopes]
    teacher, target_base = outputs[0], outputs[-1]
    teacher_base = outputs[1] if len(outputs) == 3 else None
    targets = distillation_targets(options.objective, teacher, teacher_base, target_base, options.output_weight)
    n = len(probes)
    null = None
    if null_cond is not None:
        null = NullBranch(int(null_cond), targets[n:], target_base[:n] - target_base[n:], float(options.keep_guidance))
    return student(lambda f: refine(parameters, f, probes, targets[:n], options, null=null,
                                    baseline=target_base[:n], progress=stepped, check=check))  # fmt: skip


def _concat(a: Probes, b: Probes) -> Probes:
    return Probes(torch.cat([a.x, b.x]), torch.cat([a.t, b.t]), torch.cat([a.cond, b.cond]))


def factors_like(original: LoraFactors, up2d: torch.Tensor, down2d: torch.Tensor) -> LoraFactors:
    """Refined 2-D factors back in ``original``'s layout, dtype and alpha.

    Args:
        original: the layer before refinement (conv layers keep ``(out, r, 1, 1)`` /
            ``(r, in, kh, kw)``).
        up2d: ``(out, r)``; down2d: ``(r, in·kh·kw)``; any float dtype/device.

    Returns:
        :class:`LoraFactors` on the CPU in ``original.up``'s dtype, same ``alpha``.

    Raises:
        LoraxError: a factor is non-finite, or does not fit in the original dtype (overflow).
    """
    dtype = original.up.dtype
    up = up2d.detach().to("cpu", torch.float32)
    down = down2d.detach().to("cpu", torch.float32)
    if up.shape != original.up2d().shape or down.shape != original.down2d().shape:
        raise ShapeMismatchError(f"refined factors {tuple(up.shape)}/{tuple(down.shape)} do not fit the layer's "
                                 f"{tuple(original.up2d().shape)}/{tuple(original.down2d().shape)}.")  # fmt: skip
    up, down = up.to(dtype), down.to(dtype)
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise LoraxError(f"refined factors are not finite in {dtype} (overflow); lower the learning rate.")
    return LoraFactors(up=up.reshape(original.up.shape), down=down.reshape(original.down.shape), alpha=original.alpha)


class TrainableLora(nn.Module):
    """Trainable float32 copies of LoRA factors, for hosts without their own adapter modules.

    ``delta(key)`` is ``scale · up @ down`` reshaped to the weight's shape (dense: meant for a
    student's forward pass, e.g. ``torch.func.functional_call(model, {key: W + delta})``).
    ComfyUI hosts use ComfyUI's own training adapters instead (``comfy.weight_adapter``).

    Args:
        layers: ``{model key: LoraFactors}``; never modified.
        device: where the parameters live.
    """

    def __init__(self, layers: Mapping[str, LoraFactors], device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.keys = list(layers)
        self.originals = dict(layers)
        self.ups = nn.ParameterList(
            nn.Parameter(layers[k].up2d().detach().to(device, torch.float32).clone()) for k in self.keys
        )
        self.downs = nn.ParameterList(
            nn.Parameter(layers[k].down2d().detach().to(device, torch.float32).clone()) for k in self.keys
        )
        self.scales = [layers[k].scale for k in self.keys]

    def delta(self, index: int, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """``ΔW`` of layer ``index`` reshaped to ``shape`` (float32, differentiable)."""
        return (self.ups[index] @ self.downs[index] * self.scales[index]).reshape(shape)

    def export(self) -> dict[str, LoraFactors]:
        """The current factors as :class:`LoraFactors` in each original layer's layout and dtype."""
        return {
            k: factors_like(self.originals[k], self.ups[i], self.downs[i]) for i, k in enumerate(self.keys)
        }
