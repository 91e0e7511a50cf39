"""ComfyUI glue of Compare LoRA Transfer: one sampling run per row on patched clones, decoded, in one grid.

Everything goes through ComfyUI's own machinery (reused, not rewritten):

* each row's model is the connected ``MODEL`` or a ``clone()`` of it with a LoRA's patches
  (``_host.apply_lora``: ``comfy.lora.load_lora`` → ``add_patches``): clones share the loaded
  weights, so no model is copied or loaded a second time;
* sampling is the stock KSampler path: ``comfy.sample.prepare_noise`` (same seed, so the same
  noise for every row) and ``comfy.sample.sample``; decoding is ``VAE.decode`` as VAE Decode does;
* the grid is drawn by :func:`nodes._grid.image_grid`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import comfy.sample
import comfy.samplers
import torch

from ..lorax_core.errors import IncompatibleBaseError, OptionError
from . import _host, _training

SAMPLERS: list[str] = list(comfy.samplers.KSampler.SAMPLERS)
SCHEDULERS: list[str] = list(comfy.samplers.KSampler.SCHEDULERS)

ROW_SOURCE = "source + LoRA"
ROW_TARGET = "target, no LoRA"
ROW_COPY = "target + LoRA loaded directly (copy)"
ROW_TRANSFERRED = "target + transferred"
ROW_REFINED = "target + refined"


@dataclass(frozen=True)
class Settings:
    """What every row shares: the prompts, the latent (size, batch, seed) and the sampler."""

    positive: list[Any]
    negative: list[Any]
    latent: Mapping[str, Any]
    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str

    def describe(self, strength: float) -> str:
        return (f"seed {self.seed}, {self.steps} steps, cfg {self.cfg:g}, {self.sampler_name}/{self.scheduler}, "
                f"LoRA strength {strength:g}; same prompts and noise in every row")


def row_models(source_model: Any, target_model: Any, source_lora: Mapping[str, torch.Tensor], transferred: Any,
               refined: Any | None, strength: float) -> list[tuple[str, Any | str]]:
    """``(label, MODEL or why there is none)`` per row, top to bottom; patched rows are clones.

    Raises:
        IncompatibleBaseError: the latent spaces differ, or the source LoRA does not fit the source.
    """
    source_fmt = type(source_model.get_model_object("latent_format"))
    if source_fmt is not type(target_model.get_model_object("latent_format")):
        raise IncompatibleBaseError(
            f"source_model ({_host.model_family(source_model)}) and target_model "
            f"({_host.model_family(target_model)}) work in different latent spaces; compare models of one family."
        )
    try:
        source = _host.apply_lora(source_model, None, source_lora, strength, 0.0).model
    except IncompatibleBaseError:
        raise IncompatibleBaseError(
            f"the source LoRA does not fit source_model ({_host.model_family(source_model)}); connect the base model "
            "the LoRA was trained on (the one Transfer LoRA's source is) and the same LoRA."
        ) from None
    try:
        copied: Any | str = _host.apply_lora(target_model, None, source_lora, strength, 0.0).model
    except IncompatibleBaseError as exc:
        # That loading the LoRA directly fails is an answer too: shown in its row, not an error.
        copied = f"does not load on this model: {exc}"
    rows: list[tuple[str, Any | str]] = [
        (ROW_SOURCE, source),
        (ROW_TARGET, target_model),
        (ROW_COPY, copied),
        (ROW_TRANSFERRED, _host.apply_lora(target_model, None, transferred, strength, 0.0).model),
    ]
    if refined is not None:
        rows.append((ROW_REFINED, _host.apply_lora(target_model, None, refined, strength, 0.0).model))
    return rows


def _latent_samples(latent: Mapping[str, Any], model: Any) -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, Mapping) else None
    if not isinstance(samples, torch.Tensor) or samples.is_nested or samples.ndim < 3 or samples.shape[0] == 0:
        raise OptionError("latent must be a LATENT such as Empty Latent Image's output; its batch size is the "
                          "number of images per row.")  # fmt: skip
    return _training.fit_latent(model, samples, "latent", "connect an Empty Latent Image made for this model")


def sample_rows(rows: Sequence[tuple[str, Any | str]], settings: Settings,
                vae: Any) -> list[tuple[str, torch.Tensor | str]]:
    """Sample and decode every row that has a model: ``(label, images (B, H, W, 3) in [0, 1])``.

    Every row starts from the same noise (``prepare_noise`` with the same seed and batch indices).
    """
    first = next(model for _, model in rows if not isinstance(model, str))
    samples = _latent_samples(settings.latent, first)
    noise = comfy.sample.prepare_noise(samples, settings.seed, settings.latent.get("batch_index"))
    sampled = [(label, model) for label, model in rows if not isinstance(model, str)]
    progress = _host.progress_callback()
    total = len(sampled) * settings.steps
    out: list[tuple[str, torch.Tensor | str]] = []
    done = 0
    for label, model in rows:
        if isinstance(model, str):
            out.append((label, model))
            continue

        def tick(step: int, *_: Any, before: int = done) -> None:
            progress(min(total, before + step + 1), total)

        latent = comfy.sample.sample(
            model, noise, settings.steps, settings.cfg, settings.sampler_name, settings.scheduler, settings.positive,
            settings.negative, samples, noise_mask=settings.latent.get("noise_mask"), callback=tick,
            disable_pbar=True, seed=settings.seed,
        )
        done += settings.steps
        images = vae.decode(latent)
        if images.ndim == 5:  # video VAEs decode (B, T, H, W, 3): one column per frame
            images = images.reshape(-1, *images.shape[-3:])
        out.append((label, images.to("cpu", torch.float32)))
    return out
