"""Training loops of the toy world: base models, distillation, style adapters, metric classifiers.

All loops draw their data and noise from one seeded ``torch.Generator`` so a run is exactly
reproducible on the same machine and thread count. Float32, CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from lorax_core.lorax_module import add_lorax, collect_lorax
from lorax_core.types import LoraFactors, LoraXFactors

from . import data
from .model import Diffusion, TextEncoder, ToyLDM, to_latent

__all__ = [
    "ADAPTED_SUFFIXES",
    "Classifier",
    "LoraConv2d",
    "LoraLinear",
    "add_lora",
    "collect_lora",
    "distill",
    "train_adapter",
    "train_classifier",
    "train_diffusion",
]

#: Layers an adapter trains, by module-name suffix: every attention projection and feed-forward
#: linear, the 1×1 ``proj_in``/``proj_out`` convs and both 3×3 convs of every ResBlock — the
#: "LoCon" set kohya's sd-scripts trains on SD UNets, so conv and attention layers both matter.
ADAPTED_SUFFIXES: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2",
    "proj_in", "proj_out", "in_layers.2", "out_layers.3",
)  # fmt: skip

Batch = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _adapted(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | nn.Conv2d) and any(name.endswith("." + s) for s in ADAPTED_SUFFIXES)


def _lr(step: int, steps: int, lr: float, warmup: int = 20) -> float:
    """Linear warm-up then cosine decay to 0: a cheap stand-in for weight EMA on short runs."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _drop_labels(labels: torch.Tensor, text: TextEncoder, p: float, g: torch.Generator) -> torch.Tensor:
    """Replace a fraction ``p`` of labels by the null prompt (classifier-free guidance training)."""
    drop = torch.rand(labels.shape, generator=g) < p
    return torch.where(drop, torch.full_like(labels, text.null_index), labels)


def _optimise(
    params: Iterable[torch.Tensor], steps: int, lr: float, loss_fn: Callable[[], torch.Tensor]
) -> list[float]:
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    losses: list[float] = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def train_diffusion(
    model: ToyLDM,
    text: TextEncoder,
    diffusion: Diffusion,
    batch_fn: Batch,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    cond_drop: float = 0.1,
    params: Iterable[torch.Tensor] | None = None,
) -> list[float]:
    """ε-prediction training on ``batch_fn`` data; trains ``params`` (default: all of ``model``)."""
    g = torch.Generator().manual_seed(seed)

    def loss_fn() -> torch.Tensor:
        images, labels = batch_fn(batch, g)
        context = text(_drop_labels(labels, text, cond_drop, g))
        return diffusion.training_loss(model, to_latent(images), context, g)

    model.train()
    return _optimise(model.parameters() if params is None else params, steps, lr, loss_fn)


def distill(
    student: ToyLDM,
    teacher: ToyLDM,
    text: TextEncoder,
    diffusion: Diffusion,
    batch_fn: Batch,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
) -> list[float]:
    """Output distillation (SSD-1B style): match the teacher's ε on noised data, plus the data loss.

    The student is expected to start from the teacher's weights with blocks removed
    (:func:`init_from`), as SSD-1B starts from SDXL.
    """
    g = torch.Generator().manual_seed(seed)
    teacher.eval()

    def loss_fn() -> torch.Tensor:
        images, labels = batch_fn(batch, g)
        context = text(_drop_labels(labels, text, 0.1, g))
        x0 = to_latent(images)
        t = torch.randint(0, diffusion.steps, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = diffusion.add_noise(x0, t, noise)
        with torch.no_grad():
            target = teacher(xt, t, context)
        pred = student(xt, t, context)
        return F.mse_loss(pred, target) + 0.5 * F.mse_loss(pred, noise)

    student.train()
    return _optimise(student.parameters(), steps, lr, loss_fn)


def init_from(student: ToyLDM, teacher: ToyLDM) -> list[str]:
    """Copy every teacher weight whose key exists in the student; returns the keys left out."""
    source = teacher.state_dict()
    own = student.state_dict()
    student.load_state_dict({k: source[k] if k in source else v for k, v in own.items()})
    return [k for k in source if k not in own]


class LoraLinear(nn.Module):
    """``y = base(x) + (alpha / r) · up(down(x))``: a standard LoRA (Hu et al., arXiv 2106.09685)."""

    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.down = nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / math.sqrt(base.in_features))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank))  # zero: starts as the base layer
        self.alpha = float(rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.down.T) @ self.up.T * (self.alpha / self.up.shape[1])

    def factors(self) -> LoraFactors:
        return LoraFactors(up=self.up.detach().clone(), down=self.down.detach().clone(), alpha=self.alpha)


class LoraConv2d(nn.Module):
    """Conv LoRA (LoCon): ``down`` a conv with the base kernel, ``up`` a 1×1 conv."""

    def __init__(self, base: nn.Conv2d, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        fan_in = base.weight[0].numel()
        self.down = nn.Parameter(torch.randn(rank, *base.weight.shape[1:], generator=generator) / math.sqrt(fan_in))
        self.up = nn.Parameter(torch.zeros(base.out_channels, rank, 1, 1))
        self.alpha = float(rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        h = F.conv2d(x, self.down, None, b.stride, b.padding, b.dilation)
        return b(x) + F.conv2d(h, self.up) * (self.alpha / self.up.shape[1])

    def factors(self) -> LoraFactors:
        return LoraFactors(up=self.up.detach().clone(), down=self.down.detach().clone(), alpha=self.alpha)


def add_lora(model: nn.Module, rank: int, seed: int) -> list[str]:
    """Wrap every adapted layer (:data:`ADAPTED_SUFFIXES`) of ``model`` with a LoRA, in place."""
    g = torch.Generator().manual_seed(seed)
    chosen = [(n, m) for n, m in model.named_modules() if _adapted(n, m)]
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapper = LoraLinear(module, rank, g) if isinstance(module, nn.Linear) else LoraConv2d(module, rank, g)
        setattr(parent, child, wrapper)
    return [n for n, _ in chosen]


def collect_lora(model: nn.Module) -> dict[str, LoraFactors]:
    """``{model key: LoraFactors}`` of every LoRA wrapper (keys end in ``.weight``)."""
    return {
        f"{name}.weight": module.factors()
        for name, module in model.named_modules()
        if isinstance(module, LoraLinear | LoraConv2d)
    }


def train_adapter(
    base: ToyLDM,
    kind: str,
    rank: int,
    text: TextEncoder,
    diffusion: Diffusion,
    style: str,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
) -> dict[str, LoraFactors] | dict[str, LoraXFactors]:
    """Train one style adapter on a frozen copy of ``base``; returns its layers by model key.

    ``kind`` is ``lora`` (standard LoRA of rank ``rank``) or ``lorax`` (LoRA-X with a diagonal
    ΔΣ on the top-``rank`` singular bases, :mod:`lorax_core.lorax_module`). The data is the
    base domain rendered in ``style`` for every class.
    """
    model = ToyLDM(base.config, base.depths)
    model.load_state_dict(base.state_dict())
    for p in model.parameters():
        p.requires_grad_(False)
    if kind == "lora":
        add_lora(model, rank, seed)
    else:
        add_lorax(model, include=_adapted, rank=rank)

    def batch_fn(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return data.sample_batch(b, "base", style, g)

    train_diffusion(model, text, diffusion, batch_fn, steps=steps, batch=batch, lr=lr, seed=seed)
    return collect_lora(model) if kind == "lora" else collect_lorax(model)


class Classifier(nn.Module):
    """Metric network: a small CNN with a content head (shape class), a style head and a domain head.

    ``features`` (64-d, after global pooling) is the embedding the distance metric uses,
    the way the paper's DINOv2 similarity uses a frozen network's features. The domain head
    (``base`` vs ``shifted``) tells which base model's look a sample has, whatever its style.
    """

    def __init__(
        self,
        num_classes: int = len(data.CLASSES),
        num_styles: int = len(data.STYLES),
        num_domains: int = len(data.DOMAINS),
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.content = nn.Linear(64, num_classes)
        self.style = nn.Linear(64, num_styles)
        self.domain = nn.Linear(64, num_domains)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(content, style, domain)`` logits."""
        f = self.features(images)
        return self.content(f), self.style(f), self.domain(f)


def train_classifier(steps: int, batch: int, seed: int) -> Classifier:
    """Train the metric classifier's three heads on every domain × style, with noise and blur augmentation.

    The augmentation makes the scores robust to the soft, slightly noisy look of few-step
    diffusion samples, so the style score measures the style rather than the rendering.
    """
    g = torch.Generator().manual_seed(seed)
    net = Classifier()
    blur = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16

    def loss_fn() -> torch.Tensor:
        styles = torch.randint(0, len(data.STYLES), (batch,), generator=g)
        domains = torch.randint(0, len(data.DOMAINS), (batch,), generator=g)
        labels = torch.randint(0, len(data.CLASSES), (batch,), generator=g)
        images = torch.empty(batch, 3, data.IMAGE_SIZE, data.IMAGE_SIZE)
        for si, s in enumerate(data.STYLES):
            for di, d in enumerate(data.DOMAINS):
                sel = (styles == si) & (domains == di)
                if sel.any():
                    images[sel] = data.render(labels[sel], d, s, g)
        soft = torch.rand(batch, generator=g) < 0.3
        blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), blur.expand(3, 1, 3, 3), groups=3)
        images = torch.where(soft[:, None, None, None], blurred, images)
        images = images + 0.08 * torch.rand(batch, 1, 1, 1, generator=g) * torch.randn(images.shape, generator=g)
        content, style, domain = net(images)
        return F.cross_entropy(content, labels) + F.cross_entropy(style, styles) + F.cross_entropy(domain, domains)

    net.train()
    _optimise(net.parameters(), steps, 2e-3, loss_fn)
    net.eval()
    return net
