"""ComfyUI glue of Train LoRA-X: LoRA-X as one more training weight adapter on ComfyUI's trainer.

ComfyUI's Train LoRA (``comfy_extras.nodes_train``) trains LoRA/LoHa/LoKr/OFT as weight
wrappers (``WeightAdapterTrainBase``: a module called on the weight) with its ``TrainSampler``
(noise, timesteps, loss, optimizer step, progress bar) inside ``Guider_Basic``. This module adds
LoRA-X as such an adapter (:class:`LoraXDiff`, around ``lorax_core.lorax_module.LoraXDelta``) and
runs that same machinery (reused, not rewritten):

* the bases ``U_R``/``V_R`` come from the transfer's subspace code and cache
  (``SubspaceProvider`` over ``_host.PatcherWeights`` and ``_host.subspace_cache``), float32 and
  sign-fixed, so the trained ΔΣ means the same on any machine that has the source model;
* the student is a clone of the ``MODEL`` with the wrappers, loaded and restored by
  ``_training.trainable`` (gradient checkpointing, ``requires_grad``, weight functions);
* ``TrainSampler`` runs the steps with ComfyUI's x0 MSE loss and an AdamW over the cores only.

The trained MODEL output is a fresh clone of the input with the exact standard-LoRA form of the
adapter (``up = U_R·δ``, ``down = V_Rᵀ``) as ordinary ComfyUI patches, so it holds no training
modules and samples like any LoRA-patched model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from comfy.weight_adapter.base import WeightAdapterTrainBase
from comfy_extras.nodes_custom_sampler import Guider_Basic, Noise_RandomNoise
from comfy_extras.nodes_train import TrainSampler

from ..lorax_core.errors import NothingTransferableError, OptionError
from ..lorax_core.formats.base import pair_tensors
from ..lorax_core.formats.keys import COMFY_STYLE
from ..lorax_core.formats.lorax import lorax_tensors
from ..lorax_core.formats.resolve import layer_name_for
from ..lorax_core.linalg import Subspace
from ..lorax_core.lorax_export import basis_record, lorax_to_standard
from ..lorax_core.lorax_module import LoraXDelta
from ..lorax_core.subspaces import SubspaceProvider
from ..lorax_core.types import LoraFactors, LoraXFactors, flat_shape
from . import _host
from ._training import Conditioning, copy_other_weights, fit_latent, trainable

# Which weights a layer-kind choice trains, by the module path's components (ComfyUI's own
# module names: attn1/attn2 in SD UNets, img_attn/txt_attn in Flux, attn in SD3/DiT blocks;
# ff/mlp/feed_forward for the feed-forward parts).
_ATTENTION = ("attn", "attention")
_FEED_FORWARD = ("ff", "mlp", "feed_forward", "ffn")
LAYER_KINDS: tuple[str, ...] = ("attention", "attention + feed-forward", "all linear", "all linear + conv")


def _wanted(kind: str, name: str, ndim: int) -> bool:
    parts = name.split(".")
    if kind == "all linear + conv":
        return ndim in (2, 4)
    if ndim != 2:
        return False
    if kind == "all linear":
        return True
    words = _ATTENTION + (_FEED_FORWARD if kind == "attention + feed-forward" else ())
    return any(w in part for part in parts[:-1] for w in words)


class LoraXDiff(WeightAdapterTrainBase):
    """A LoRA-X layer as a ComfyUI training weight adapter: ``W ↦ W + U_R·diag(δ)·V_Rᵀ``.

    ComfyUI calls it on the (cast) weight in every forward, like ``LoraDiff``; ``move_to``
    (inherited) moves the bases and the core with the model.
    """

    def __init__(self, delta: LoraXDelta) -> None:
        super().__init__()
        self.delta = delta

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return self.delta(weight)

    def passive_memory_usage(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.parameters(), *self.buffers()))


@dataclass
class TrainSetup:
    """The checked inputs of one training run.

    Attributes:
        latents: ``(N, C, …)`` the training latents, in the model's latent space (as VAE Encode gives).
        positive: one conditioning entry per latent.
        keys: the model keys to train, in model order.
        excluded: ``{reason: count}`` of the diffusion model's weights not trained.
    """

    latents: torch.Tensor
    positive: Conditioning
    keys: list[str]
    excluded: dict[str, int]


@dataclass
class TrainOutcome:
    """What :func:`train` produced."""

    factors: dict[str, LoraXFactors]
    standard: dict[str, LoraFactors]
    metadata: dict[str, str]
    losses: list[float]
    clipped: int


class LoraXAdapter(dict):
    """The ``lorax`` output: a ``LORA_MODEL`` holding LoRA-X tensors (``<layer>.lorax_core``/``.lorax_shape``).

    Transfer LoRA takes it as its ``lora`` input (a LoRA-X transfer, LoRA-X Eq. 3); Save LoRA-X
    writes it. The attributes keep what the tensors alone cannot carry.

    Attributes:
        factors: ``{model key: LoraXFactors}``.
        standard: ``{model key: LoraFactors}``, the exact rank-R standard LoRA of the same ΔW.
        metadata: the basis record (:func:`lorax_core.lorax_export.basis_record`) and training provenance.
    """

    factors: dict[str, LoraXFactors]
    standard: dict[str, LoraFactors]
    metadata: dict[str, str]


def standard_tensors(standard: Mapping[str, LoraFactors]) -> dict[str, torch.Tensor]:
    """A plain ComfyUI-native ``LORA_MODEL`` (``lora_up``/``lora_down``/``alpha``) for the stock loaders."""
    out: dict[str, torch.Tensor] = {}
    for key, f in standard.items():
        out.update(pair_tensors(layer_name_for(key, "comfy"), f, COMFY_STYLE))
    return out


def wrap_adapter(outcome: TrainOutcome) -> LoraXAdapter:
    out = LoraXAdapter()
    for key, f in outcome.factors.items():
        out.update(lorax_tensors(layer_name_for(key, "comfy"), f))
    out.factors = dict(outcome.factors)
    out.standard = dict(outcome.standard)
    out.metadata = dict(outcome.metadata)
    return out


# --------------------------------------------------------------------------- inputs


def prepare(model: Any, latent: Mapping[str, Any], positive: Conditioning, kind: str) -> TrainSetup:
    """Check the node's inputs; pick the layers of ``kind``.

    Raises:
        OptionError: a latent or conditioning that does not fit, an unknown layer kind.
        NothingTransferableError: no layer of that kind in the model.
    """
    if kind not in LAYER_KINDS:
        raise OptionError(f"layers {kind!r} is not one of {', '.join(LAYER_KINDS)}; pick one from the list.")
    samples = latent.get("samples") if isinstance(latent, Mapping) else None
    if not isinstance(samples, torch.Tensor) or samples.is_nested or samples.ndim < 4:
        raise OptionError("latents must be a LATENT of training images, e.g. VAE Encode's output of your images.")
    if samples.shape[0] == 0:
        raise OptionError("latents has batch size 0; encode at least one training image.")
    samples = fit_latent(model, samples, "latents", "encode the training images with this model's VAE")
    count = samples.shape[0]
    if not positive or len(positive) not in (1, count):
        raise OptionError(
            f"positive holds {len(positive or [])} conditionings for {count} latents; connect one prompt for all "
            f"of them, or a batch of {count} (one per latent, in order)."
        )
    positive = list(positive) * count if len(positive) == 1 else list(positive)
    keys, excluded = [], {}
    for name, module in model.model.diffusion_model.named_modules():
        weight = getattr(module, "weight", None)
        if not hasattr(module, "weight_function") or weight is None:
            continue
        if _wanted(kind, name, weight.ndim):
            keys.append(f"{_host.UNET_PREFIX}{name}.weight")
        else:
            reason = (
                f"not in layers={kind!r}"
                if weight.ndim in (2, 4)
                else f"{weight.ndim}-D weight (norms, embeddings, 1-D/3-D convs are not LoRA-X layers)"
            )
            excluded[reason] = excluded.get(reason, 0) + 1
    if not keys:
        raise NothingTransferableError(
            f"the {_host.model_family(model)} model has no {kind!r} layer to train; pick another layers option "
            "(all linear trains every linear layer)."
        )
    return TrainSetup(latents=samples, positive=positive, keys=keys, excluded=excluded)


# --------------------------------------------------------------------------- training


def _student(
    model: Any, setup: TrainSetup, rank: int, bases: Callable[[str, int], Subspace], dtype: torch.dtype
) -> tuple[Any, dict[str, LoraXDiff], int]:
    """A clone of ``model`` with a :class:`LoraXDiff` on each chosen weight; how many ranks were clipped."""
    student = model.clone()
    student.set_model_compute_dtype(dtype)
    state = student.model_state_dict()
    adapters, clipped = {}, 0
    for key in setup.keys:
        shape = tuple(state[key].shape)
        flat = flat_shape(shape)
        R = min(rank, *flat)
        clipped += R < rank
        adapters[key] = LoraXDiff(LoraXDelta(bases(key, R), shape))
        student.add_weight_wrapper(key, adapters[key])
    copy_other_weights(student, adapters)
    return student, adapters, clipped


def train(
    model: Any,
    setup: TrainSetup,
    *,
    rank: int,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    dtype: torch.dtype,
    use_cache: bool,
) -> TrainOutcome:
    """Train the LoRA-X cores of ``setup.keys`` on ``setup.latents`` with ComfyUI's ``TrainSampler``."""
    weights = _host.PatcherWeights(model)
    provider = SubspaceProvider(_host.subspace_cache(use_cache), _host.compute_device())
    subspaces: dict[str, Subspace] = {}

    def bases(key: str, R: int) -> Subspace:
        if key not in subspaces:
            subspaces[key] = provider.get(weights, key, R)
        return subspaces[key]

    losses: list[float] = []
    with torch.inference_mode(False):
        student, adapters, clipped = _student(model, setup, rank, bases, dtype)
        cores = [a.delta.core for a in adapters.values()]
        sampler = TrainSampler(
            torch.nn.MSELoss(),
            torch.optim.AdamW(cores, lr=lr),
            loss_callback=losses.append,
            batch_size=batch,
            total_steps=steps,
            seed=seed,
            training_dtype=dtype,
        )
        latents = setup.latents.to(dtype)
        guider = Guider_Basic(student)
        guider.set_conds(setup.positive)
        noise = Noise_RandomNoise(seed)
        # TrainSampler draws timesteps and batches from torch's global generator: seed a fork of it,
        # so a run is reproducible and the caller's random state is left alone.
        with torch.random.fork_rng(devices=[]), trainable(student, adapters):
            torch.manual_seed(seed)
            guider.sample(
                noise.generate_noise({"samples": latents}), latents, sampler, torch.arange(latents.shape[0]), seed=seed
            )
    factors = {key: a.delta.factors() for key, a in adapters.items()}
    standard = lorax_to_standard(factors, bases)
    metadata = basis_record(factors, bases, weights.fingerprint)
    return TrainOutcome(factors=factors, standard=standard, metadata=metadata, losses=losses, clipped=clipped)


def trained_model(model: Any, standard: Mapping[str, LoraFactors]) -> Any:
    """A clone of ``model`` patched with the adapter's exact standard-LoRA form (ComfyUI's own patches)."""
    return _host.apply_lora(model, None, standard_tensors(standard), 1.0, 0.0).model
