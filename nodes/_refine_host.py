"""ComfyUI glue of Refine Transferred LoRA: the models, samplers and adapters ``lorax_core.refine`` runs on.

The core (``lorax_core.refine``) works on abstract denoisers; this module builds them from
ComfyUI's own machinery (reused, not rewritten):

* the teacher is the source ``MODEL`` + the source LoRA, patched by ComfyUI's loader
  (``_host.apply_lora``: ``comfy.lora.load_lora`` → ``clone()`` + ``add_patches``);
* the generations come from ``comfy.sample.sample`` (the KSampler path), from the teacher and
  the target + the transferred LoRA as ``lorax_core.refine.generation_split`` shares them out
  (at the defaults, all from the teacher);
* every prediction runs inside ComfyUI's guider (``Guider_Basic.sample``) through a
  ``comfy.samplers.Sampler`` whose ``sample`` runs our loop instead of sampling — the pattern of
  ``comfy_extras.nodes_train.TrainSampler``. The guider loads the model onto the GPU, encodes the
  conditionings (cross-attention, ``y``/pooled, any family's extra conds) and applies the
  model's patches;
* the noise comes from the model's ``model_sampling`` (``sigma(timestep)``, ``noise_scaling``);
* the student is a clone of the target with ComfyUI's training weight adapters
  (``comfy.weight_adapter.lora.LoraDiff``) as weight wrappers, trained under
  ``torch.inference_mode(False)`` with gradient checkpointing, as ``TrainLoraNode`` does.

Predictions are compared as ``(x − denoised) / σ``: the ε prediction of ε/v models and the
velocity of flow models. Raw ``denoised`` (x0) is dominated by the input at low σ and would
weight the timesteps very unevenly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import comfy.model_management
import comfy.sample
import comfy.samplers
import folder_paths
import torch
from comfy.weight_adapter.lora import LoraDiff
from comfy_extras.nodes_custom_sampler import Guider_Basic
from comfy_extras.nodes_train import (
    process_cond_list,
)

from ..lorax_core.errors import FormatError, IncompatibleBaseError, NothingTransferableError, OptionError
from ..lorax_core.formats.base import pair_tensors
from ..lorax_core.formats.io import load_tensors
from ..lorax_core.formats.keys import COMFY_STYLE
from ..lorax_core.refine import (
    Noiser,
    RefineOptions,
    RefineResult,
    Scope,
    Teachers,
    distil,
    factors_like,
    generation_split,
)
from ..lorax_core.types import LoraFactors
from . import _host
from ._training import Conditioning, copy_other_weights, fit_latent, trainable

# ComfyUI's KSampler defaults: a sampler and scheduler every model family supports.
SAMPLER_NAME = "euler"
SCHEDULER = "simple"

Body = Callable[[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]], Any]


@dataclass
class RefineSetup:
    """Everything one refinement needs, checked (:func:`prepare`).

    Attributes:
        teacher: the source ``MODEL`` with the source LoRA (a patched clone).
        source: the source ``MODEL`` as given (the teacher's base).
        target: the target ``MODEL`` as given.
        start: the target with the transferred LoRA (a patched clone): the student's start.
        layers: ``{target model key: LoraFactors}`` of the diffusion-model layers to refine.
        conds: the host's list of conditionings, each a ``CONDITIONING``: one per entry of
            ``positive`` (one prompt each), then the neutral prompt (the first prompt zeroed out
            when none is given).
        prompts: how many of ``conds`` are the user's prompts.
        null_cond: index of the neutral prompt in ``conds`` (the last).
        neutral_given: whether the neutral prompt was an input (else the zeroed prompt).
        latent: ``(B, C, …)`` the generations' shape (channels fitted to the model).
    """

    teacher: Any
    source: Any
    target: Any
    start: Any
    layers: dict[str, LoraFactors]
    conds: list[Conditioning]
    prompts: int
    null_cond: int
    neutral_given: bool
    latent: torch.Tensor

    @property
    def negative(self) -> Conditioning:
        """The generations' negative prompt: the neutral one."""
        return self.conds[self.null_cond]


@dataclass
class RefineOutcome:
    """What :func:`run` produced: the refined layers, the core's result and the generation counts."""

    layers: dict[str, LoraFactors]
    result: RefineResult
    generations: tuple[int, int]


class Progress:
    """One ComfyUI progress bar over generation, teacher passes and training (a cancel point each tick)."""

    def __init__(self, total: int) -> None:
        self.done = 0
        self.total = max(1, total)
        self._update = _host.progress_callback()

    def tick(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        self._update(self.done, self.total)

    def after(self, ahead: int, done: int, total: int) -> None:
        """Report ``ahead + done`` of ``ahead + total`` (the core's own count after ``ahead`` ticks of ours)."""
        self.total = max(1, ahead + total)
        self.done = 0
        self.tick(ahead + done)


# --------------------------------------------------------------------------- inputs


def source_lora_tensors(name: str | None, lora: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The source LoRA's tensors as ComfyUI's loader takes them: the ``LORA_MODEL`` input, else the file."""
    if lora is not None:
        return dict(lora)
    if not name:
        raise FormatError("no source LoRA: pick the file the transfer started from in lora_name, "
                          "or connect it as a LORA_MODEL input.")  # fmt: skip
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise FormatError(f"LoRA {name!r} is not in ComfyUI's loras folders; refresh the page (R) and pick it again.")
    return load_tensors(path)[0]


def refinable_layers(transferred: Any, target: Any) -> dict[str, LoraFactors]:
    """The diffusion-model layers of a Transfer LoRA result, checked against the target ``MODEL``.

    Text-encoder layers are not refined (only the diffusion model is distilled) and pass
    through unchanged.

    Raises:
        FormatError: a plain ``LORA_MODEL`` (no layer map to write the result back with).
        NothingTransferableError: no diffusion-model layer.
        IncompatibleBaseError: a layer that is not in the target, or whose shape does not fit.
    """
    if not isinstance(transferred, _host.TransferredLora):
        raise FormatError(
            f"transferred is a plain LORA_MODEL ({len(transferred)} tensors) without the transfer's layer map; "
            "connect the lora output of Transfer LoRA (its method copy takes a LoRA that already fits the target)."
        )
    layers = {k: f for k, f in transferred.factors.items() if k.startswith(_host.UNET_PREFIX)}
    # DoRA re-normalises the patched weight (lorax_core.lycoris.dora_magnitude): its effect is not
    # the additive up·down this refinement distils, and a refined pair would lose the magnitude.
    dora = sorted(k for k, f in layers.items() if getattr(f, "dora_scale", None) is not None)
    if dora:
        raise FormatError(
            f"{dora[0]} and {len(dora) - 1} other transferred layers carry a DoRA magnitude; refinement distils additive "
            "LoRA updates only. Use the Transfer LoRA result as it is, or transfer a LoRA without DoRA."
        )
    if not layers:
        raise NothingTransferableError(
            f"the transferred LoRA has no diffusion-model layer to refine ({len(transferred.factors)} text-encoder "
            "layers, kept as they are); transfer a LoRA that changes the diffusion model."
        )
    state = target.model_state_dict()
    misfits = []
    for key, f in layers.items():
        if key not in state:
            misfits.append(f"{key} is not in the model")
        elif (f.out_features, f.in_features) != (state[key].shape[0], state[key][0].numel()):
            misfits.append(f"{key}: the LoRA changes a {f.out_features}×{f.in_features} weight, the model's is "
                           f"{state[key].shape[0]}×{state[key][0].numel()}")  # fmt: skip
    if misfits:
        raise IncompatibleBaseError(
            f"{len(misfits)} of the transferred LoRA's {len(layers)} layers do not fit this "
            f"{_host.model_family(target)} target_model (e.g. {misfits[0]}); "
            "connect the model Transfer LoRA's target was."
        )
    return layers


def generation_latent(latent: Mapping[str, Any], model: Any) -> torch.Tensor:
    """The ``LATENT``'s samples with the model's channel count (``fix_empty_latent_channels``), checked."""
    samples = latent.get("samples") if isinstance(latent, Mapping) else None
    if not isinstance(samples, torch.Tensor) or samples.is_nested or samples.ndim < 3:
        raise OptionError("latent must be a LATENT such as Empty Latent Image's output (its size and batch size "
                          "are the generations').")  # fmt: skip
    if samples.shape[0] == 0:
        raise OptionError("latent has batch size 0; give Empty Latent Image a batch size of 2 or more.")
    return fit_latent(model, samples, "latent", "connect an Empty Latent Image made for this model")


def prepare(source_model: Any, target_model: Any, transferred: Any, positive: Conditioning,
            neutral: Conditioning | None, latent: Mapping[str, Any], lora_name: str | None,
            lora: Mapping[str, torch.Tensor] | None) -> RefineSetup:
    """Check the node's inputs and build the teacher and the student's start (patched clones; inputs untouched).

    Raises:
        LoraxError: any input that does not fit (the message names it and the fix).
    """
    layers = refinable_layers(transferred, target_model)
    source_fmt = type(source_model.get_model_object("latent_format"))
    target_fmt = type(target_model.get_model_object("latent_format"))
    if source_fmt is not target_fmt:
        raise IncompatibleBaseError(
            f"source_model ({_host.model_family(source_model)}) and target_model ({_host.model_family(target_model)}) "
            "work in different latent spaces; refine between models of one family."
        )
    if not positive:
        raise OptionError("positive holds no prompt; connect a CLIP Text Encode with a prompt the LoRA is used with.")
    samples = generation_latent(latent, target_model)
    try:
        teacher = _host.apply_lora(source_model, None, source_lora_tensors(lora_name, lora), 1.0, 0.0).model
    except IncompatibleBaseError:
        raise IncompatibleBaseError(
            f"the source LoRA does not fit source_model ({_host.model_family(source_model)}); connect the base model "
            "the LoRA was trained on (the one Transfer LoRA's source is) and the same LoRA."
        ) from None
    start = _host.apply_lora(target_model, None, transferred, 1.0, 0.0).model
    conds: list[Conditioning] = [[entry] for entry in positive]
    # The content-keeping term needs a neutral prompt; without one, the prompt zeroed out is the
    # neutral branch (what the generations use as their negative too).
    conds.append(list(neutral) if neutral else _zero_out(conds[0]))
    return RefineSetup(teacher=teacher, source=source_model, target=target_model, start=start, layers=layers,
                       conds=conds, prompts=len(positive), null_cond=len(conds) - 1, neutral_given=bool(neutral),
                       latent=samples)


def _zero_out(conditioning: Conditioning) -> Conditioning:
    """What ComfyUI's ConditioningZeroOut does: zero cross-attention and pooled outputs."""
    out = []
    for tensor, extras in conditioning:
        extras = dict(extras)
        if extras.get("pooled_output") is not None:
            extras["pooled_output"] = torch.zeros_like(extras["pooled_output"])
        out.append([torch.zeros_like(tensor), extras])
    return out


# --------------------------------------------------------------------------- running models


class _Runner(comfy.samplers.Sampler):
    """A ComfyUI sampler that runs ``body(denoiser)`` instead of sampling (``TrainSampler``'s pattern).

    ``Guider_Basic.sample`` calls :meth:`sample` with the model loaded on its device and the
    conditionings processed. The denoiser runs each conditioning's probes as one sub-batch:
    ComfyUI's ``calc_cond_batch`` applies every conditioning in ``conds["positive"]`` to the
    whole batch and averages them, so a batch must not mix prompts.
    """

    def __init__(self, body: Body, groups: Sequence[Sequence[int]]) -> None:
        self.body = body
        self.groups = [list(g) for g in groups]
        self.result: Any = None

    def sample(self, model_wrap: Any, sigmas: torch.Tensor, extra_args: dict[str, Any], callback: Any,
               noise: torch.Tensor, latent_image: torch.Tensor | None = None, denoise_mask: torch.Tensor | None = None,
               disable_pbar: bool = False) -> torch.Tensor:
        # Conditioning tensors made under inference mode cannot be saved for backward; clone them.
        model_wrap.conds = process_cond_list(model_wrap.conds)
        entries = model_wrap.conds["positive"]
        groups = [[entries[i] for i in g] for g in self.groups]
        device = noise.device

        def denoiser(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            x, sigma = x.to(device), t.to(device, torch.float32)
            pieces, order = [], []
            for k in torch.unique(cond).tolist():
                index = (cond == k).nonzero().flatten()
                model_wrap.conds["positive"] = groups[k]
                xi, si = x[index.to(device)], sigma[index.to(device)]
                denoised = model_wrap(xi, si, **extra_args)
                pieces.append((xi - denoised.float()) / si.reshape(-1, *[1] * (xi.ndim - 1)))
                order.append(index)
            inverse = torch.argsort(torch.cat(order))
            return torch.cat(pieces)[inverse.to(device)]

        self.result = self.body(denoiser)
        return torch.zeros_like(noise)


def _flat(conds: Sequence[Conditioning]) -> tuple[Conditioning, list[list[int]]]:
    flat: Conditioning = []
    groups = []
    for conditioning in conds:
        groups.append(list(range(len(flat), len(flat) + len(conditioning))))
        flat.extend(conditioning)
    return flat, groups


def with_denoiser(model: Any, conds: Sequence[Conditioning], batch_shape: Sequence[int], body: Body, seed: int) -> Any:
    """Run ``body(denoiser)`` with ``model`` loaded by ComfyUI's guider; return what ``body`` returned."""
    flat, groups = _flat(conds)
    guider = Guider_Basic(model)
    guider.set_conds(flat)
    runner = _Runner(body, groups)
    zeros = torch.zeros(tuple(batch_shape))
    sampling = model.get_model_object("model_sampling")
    sigmas = torch.tensor([float(sampling.sigma_max), 0.0])
    guider.sample(zeros, zeros, runner, sigmas, seed=seed)
    return runner.result


def model_noiser(model: Any) -> Noiser:
    """The core's Noiser for ``model``: level ``u`` in [0, 1] is the timestep ``t(σ_min) + u·(t(σ_max) − t(σ_min))``.

    ``x_t = noise_scaling(σ(t), ε, x0)`` with the model's own ``model_sampling``, so the levels
    the core draws cover an SD1.5 schedule, a flow model's shifted one, … the same way.
    """
    sampling = model.get_model_object("model_sampling")
    low = float(sampling.timestep(sampling.sigma_min))
    high = float(sampling.timestep(sampling.sigma_max))

    def noiser(x0: torch.Tensor, level: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        timestep = low + level.to(torch.float32) * (high - low)
        sigma = sampling.sigma(timestep).to("cpu", torch.float32)
        noise = torch.randn(x0.shape, generator=generator)
        return sampling.noise_scaling(sigma, noise, x0, False), sigma

    return noiser


def generate(setup: RefineSetup, split: tuple[int, int], steps: int, cfg: float, seed: int,
             progress: Progress) -> tuple[torch.Tensor, torch.Tensor]:
    """The models' own samples: ``(latents (B, C, …) in the model's latent space, prompt index (B,))``.

    The first ``split[0]`` of the batch come from the teacher, the other ``split[1]`` from the
    target with the transferred LoRA (:func:`lorax_core.refine.generation_split`); each part
    cycles through the prompts.
    """
    batch = setup.latent.shape[0]
    noise = comfy.sample.prepare_noise(setup.latent, seed)
    out = torch.empty(setup.latent.shape, dtype=torch.float32)
    prompt_of = torch.empty(batch, dtype=torch.int64)
    first = split[0]
    for model, part in ((setup.teacher, range(first)), (setup.start, range(first, batch))):
        for prompt in range(setup.prompts):
            index = torch.tensor([i for j, i in enumerate(part) if j % setup.prompts == prompt], dtype=torch.int64)
            if len(index) == 0:
                continue
            samples = comfy.sample.sample(
                model, noise[index], steps, cfg, SAMPLER_NAME, SCHEDULER, setup.conds[prompt], setup.negative,
                setup.latent[index], callback=lambda *_: progress.tick(), disable_pbar=True, seed=seed,
            )
            out[index] = samples.to("cpu", torch.float32)
            prompt_of[index] = prompt
    return out, prompt_of


def generation_calls(setup: RefineSetup, split: tuple[int, int]) -> int:
    """How many ``comfy.sample.sample`` calls :func:`generate` makes (for the progress total)."""
    return sum(min(setup.prompts, count) for count in split)


def _student(target: Any, layers: Mapping[str, LoraFactors]) -> tuple[Any, dict[str, LoraDiff]]:
    """A clone of ``target`` with a trainable ``LoraDiff`` (float32) on each layer, and those adapters."""
    student = target.clone()
    if student.model_dtype() == torch.float16 and comfy.model_management.should_use_bf16(student.load_device):
        # There is no loss scaling here, and the gradients of a distillation loss are tiny:
        # float16 activations would flush them to zero. bfloat16 has float32's range (Train
        # LoRA computes in bfloat16 by default for the same reason).
        student.set_model_compute_dtype(torch.bfloat16)
    adapters = {}
    for key, f in layers.items():
        # LoraDiff's scale is alpha / rank; LoraFactors.scale is alpha / rank, or 1 without alpha.
        adapters[key] = LoraDiff((f.up2d().float(), f.down2d().float(), f.scale * f.rank, None, None, None))
        student.add_weight_wrapper(key, adapters[key])
    copy_other_weights(student, adapters)
    return student, adapters


def run(setup: RefineSetup, options: RefineOptions, sample_steps: int, cfg: float) -> RefineOutcome:
    """Generate, then hand the whole refinement to the core (:func:`lorax_core.refine.distil`).

    Each model is a scope that runs the core's body inside ComfyUI's guider with that model
    loaded: the teacher predictions run model by model (source + LoRA, source, target) and are
    kept on the CPU, so only one diffusion model needs to be on the GPU at any time (ComfyUI
    offloads the others when VRAM is short), which is what is meant to make SDXL fit 12–16 GB
    (not measured yet). Training then frees the GPU of every other model.
    """
    split = generation_split(setup.latent.shape[0], options)
    calls = generation_calls(setup, split)
    progress = Progress(calls * sample_steps)
    latents, prompt_of = generate(setup, split, sample_steps, cfg, options.seed, progress)
    clean = setup.target.model.process_latent_in(latents)
    shape = (min(options.batch, options.probes), *clean.shape[1:])
    with torch.inference_mode(False):
        student, adapters = _student(setup.target, setup.layers)
    params = [p for a in adapters.values() for p in (a.lora_up.weight, a.lora_down.weight)]

    def scope(model: Any) -> Scope:
        return lambda body: with_denoiser(model, setup.conds, shape, body, options.seed)

    def student_scope(body: Callable[..., Any]) -> Any:
        with torch.inference_mode(False), trainable(student, adapters):
            return with_denoiser(student, setup.conds, shape, body, options.seed)

    teachers = Teachers(scope(setup.teacher), scope(setup.source), scope(setup.target))
    result = distil(params, student_scope, teachers, clean, prompt_of, model_noiser(setup.target), options,
                    null_cond=setup.null_cond,
                    progress=lambda done, total: progress.after(calls * sample_steps, done, total),
                    check=comfy.model_management.throw_exception_if_processing_interrupted)  # fmt: skip
    refined = {key: factors_like(setup.layers[key], a.lora_up.weight, a.lora_down.weight)
               for key, a in adapters.items()}
    return RefineOutcome(layers=refined, result=result, generations=split)


def wrap_refined(transferred: Any, refined: Mapping[str, LoraFactors], metadata: Mapping[str, str]) -> Any:
    """A ``TransferredLora`` like ``transferred`` with the refined layers: same keys, layer names and key style."""
    out = _host.TransferredLora(transferred)
    for key, factors in refined.items():
        out.update(pair_tensors(key.removesuffix(".weight"), factors, COMFY_STYLE))
    out.factors = {**transferred.factors, **refined}
    out.layer_names = dict(transferred.layer_names)
    out.lora_file = transferred.lora_file
    out.metadata = {**transferred.metadata, **metadata}
    out.report = transferred.report
    return out
