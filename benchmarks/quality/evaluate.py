"""Sampling with an adapter merged into a base model, and the metrics of the protocol.

Metrics (the toy counterparts of the paper's HPSv2 / DINOv2 / LPIPS triad):

* ``style`` — the metric classifier's mean probability that a sample shows the adapter's style;
* ``content`` — the classifier's shape-class accuracy against the prompt (the class label);
* ``look`` — the classifier's mean probability that a sample shows the *target's* own domain
  (``base`` or ``shifted``): whether the adapter kept the look of the model it was moved to
  (a style LoRA on Pony should still draw Pony), not a term of the paper's triad;
* ``distance`` — squared MMD (RBF kernel, fixed bandwidth) between the classifier features of
  a method's samples and the retrained reference's samples for the same prompts and seeds;
  ``paired`` — mean feature distance between the two images of each (prompt, seed) pair,
  the reading reviewers give the paper's DINOv2 column.

Style, content and look are scored per image and reported as the mean with its standard error
(sample std / √n, n = every image of the cell); a ±95 % interval is ±1.96 standard errors.
Distance and paired are computed per sampling seed (a set statistic) and reported as the mean
over seeds with the standard error over seeds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lorax_core.types import LoraFactors

from . import data
from .model import Diffusion, TextEncoder, ToyLDM, ddim_sample
from .train import Classifier

__all__ = ["Sampler", "Scores", "classifier_accuracy", "feature_bandwidth", "merge", "mmd2", "score"]


def merge(state: Mapping[str, torch.Tensor], layers: Mapping[str, LoraFactors]) -> dict[str, torch.Tensor]:
    """A new state dict ``W + scale · up @ down`` for every adapter layer (keys are model keys).

    Building the dense ΔW is fine here: the benchmark's layers are at most 64×576.
    """
    merged = dict(state)
    for key, f in layers.items():
        w = merged[key]
        delta = (f.up2d().float() * f.scale) @ f.down2d().float()
        merged[key] = w + delta.reshape(w.shape).to(w.dtype)
    return merged


@dataclass(frozen=True)
class Sampler:
    """Generates the fixed evaluation set: ``seeds`` × ``per_seed`` images, same prompts and noise.

    ``chunk`` images go through the model per pass. Every image's trajectory is its own, so
    the chunk size changes the speed, not the samples (up to float rounding; 160 and 640 gave
    the same samples to the bit on the 2-core VM). There, 160 images per pass sampled the
    640-image set in 11.3–11.9 s against 14.2–14.8 s in one pass (the activations of a smaller
    pass stay in the CPU's caches).
    """

    text: TextEncoder
    diffusion: Diffusion
    seeds: int
    per_seed: int
    steps: int
    guidance: float
    chunk: int = 160

    def labels(self) -> torch.Tensor:
        return data.balanced_labels(self.per_seed).repeat(self.seeds)

    def __call__(self, model: ToyLDM, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Samples ``(seeds·per_seed, 3, 16, 16)``; seed s draws its noise from generator seed 1000 + s.

        ``model`` only gives the architecture: the weights are loaded into a fresh instance, because
        ``load_state_dict`` copies into the parameters in place and would otherwise leak one
        method's merged adapter into the base weights every later method starts from.
        """
        model = ToyLDM(model.config, model.depths)
        model.load_state_dict(dict(state))
        model.eval()
        noise = torch.cat(
            [torch.randn((self.per_seed, 12, 8, 8), generator=torch.Generator().manual_seed(1000 + s))
             for s in range(self.seeds)]
        )  # fmt: skip
        labels = self.labels()
        return torch.cat([
            ddim_sample(model, self.diffusion, self.text, part_labels, part_noise, self.steps, self.guidance)
            for part_labels, part_noise in zip(labels.split(self.chunk), noise.split(self.chunk), strict=True)
        ])  # fmt: skip


@dataclass
class Scores:
    """Metric values of one (target, adapter, method) cell: per image (style, content, look), per seed (the rest)."""

    style: list[float]
    content: list[float]
    look: list[float]
    distance: list[float] | None = None
    paired: list[float] | None = None

    def summary(self) -> dict[str, float | None]:
        """``{metric: mean, metric_se: standard error of the mean}`` for every metric (``None`` when absent).

        Also the style split by look: ``own_look_share`` (share of images whose look is > 0.5,
        i.e. that the classifier reads as the target's own domain), ``style_own_look`` and
        ``style_other_look`` (mean style of those images and of the others, ``None`` when there
        are none) with their standard errors. A target that draws both domains (``finetuned``)
        can then show whether a method's style holds in the samples that keep its look.
        """
        out: dict[str, float | None] = {}
        for name in ("style", "content", "look", "distance", "paired"):
            out[name], out[f"{name}_se"] = _mean_se(getattr(self, name))
        own = [s for s, look in zip(self.style, self.look, strict=True) if look > 0.5]
        other = [s for s, look in zip(self.style, self.look, strict=True) if look <= 0.5]
        out["own_look_share"] = len(own) / len(self.look) if self.look else None
        out["style_own_look"], out["style_own_look_se"] = _mean_se(own or None)
        out["style_other_look"], out["style_other_look_se"] = _mean_se(other or None)
        return out


def _mean_se(values: list[float] | None) -> tuple[float | None, float | None]:
    """Mean and its standard error (sample std / √n; 0 for one value); ``(None, None)`` for no values."""
    if values is None:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    """Biased squared MMD with an RBF kernel ``exp(−‖a−b‖² / (2 bw²))`` (≥ 0, 0 for equal sets)."""

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * bandwidth**2))

    return float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


@torch.no_grad()
def score(
    classifier: Classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    style_index: int,
    domain_index: int,
    seeds: int,
    reference: torch.Tensor | None,
    bandwidth: float,
) -> Scores:
    """Style, content, look (of domain ``domain_index``) per image and, with a reference set, distance per seed."""
    feats = classifier.features(images)
    content_logits, style_logits = classifier.content(feats), classifier.style(feats)
    style_p = style_logits.softmax(dim=1)[:, style_index]
    domain_p = classifier.domain(feats).softmax(dim=1)[:, domain_index]
    correct = (content_logits.argmax(dim=1) == labels).float()
    ref_feats = classifier.features(reference) if reference is not None else None
    result = Scores(style=style_p.tolist(), content=correct.tolist(), look=domain_p.tolist(),
                    distance=[] if reference is not None else None,
                    paired=[] if reference is not None else None)  # fmt: skip
    if ref_feats is not None and result.distance is not None and result.paired is not None:
        for f_seed, idx in zip(feats.chunk(seeds), torch.arange(len(images)).chunk(seeds), strict=True):
            r_seed = ref_feats[idx]
            result.distance.append(mmd2(f_seed, r_seed, bandwidth))
            result.paired.append(float((f_seed - r_seed).norm(dim=1).mean() / bandwidth))
    return result


@torch.no_grad()
def feature_bandwidth(classifier: Classifier, seed: int = 7, count: int = 256) -> float:
    """Median pairwise feature distance of clean renders (every domain and style): the RBF bandwidth."""
    g = torch.Generator().manual_seed(seed)
    parts = [data.render(data.balanced_labels(count // 6), d, s, g) for d in data.DOMAINS for s in data.STYLES]
    feats = classifier.features(torch.cat(parts))
    return float(torch.cdist(feats, feats).median())


@torch.no_grad()
def classifier_accuracy(classifier: Classifier, seed: int = 11, count: int = 128) -> dict[str, float]:
    """Content, style and domain accuracy of the metric classifier on fresh clean renders of every domain × style."""
    g = torch.Generator().manual_seed(seed)
    result: dict[str, float] = {}
    for di, d in enumerate(data.DOMAINS):
        for si, s in enumerate(data.STYLES):
            labels = data.balanced_labels(count)
            content, style, domain = classifier(data.render(labels, d, s, g))
            result[f"{d}/{s}/content"] = round(float((content.argmax(1) == labels).float().mean()), 3)
            result[f"{d}/{s}/style"] = round(float((style.argmax(1) == si).float().mean()), 3)
            result[f"{d}/{s}/domain"] = round(float((domain.argmax(1) == di).float().mean()), 3)
    return result
