"""Training loops of the toy world: base models, distillation, style adapters, metric classifiers.

All loops draw their data and noise from one seeded ``torch.Generator`` so a run is exactly
reproducible on the same machine and thread count. Float32, CPU.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from lorax_core.lorax_module import add_lorax, collect_lorax
from lorax_core.lycoris import LycorisLayer, build_lycoris
from lorax_core.types import LoraFactors, LoraXFactors

from . import data
from .model import Diffusion, TextEncoder, ToyLDM, to_latent

__all__ = [
    "ADAPTED_SUFFIXES",
    "LYCORIS_KINDS",
    "Classifier",
    "LohaLayer",
    "LokrLayer",
    "LoraConv2d",
    "LoraLinear",
    "add_lora",
    "add_lycoris",
    "collect_lora",
    "collect_lycoris",
    "distill",
    "kron_split",
    "lycoris_layer",
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


def _wrap(model: nn.Module, seed: int, make: Callable[[nn.Module, torch.Generator], nn.Module]) -> list[str]:
    """Replace every adapted layer (:data:`ADAPTED_SUFFIXES`) of ``model`` by ``make(layer, generator)``, in place."""
    g = torch.Generator().manual_seed(seed)
    chosen = [(n, m) for n, m in model.named_modules() if _adapted(n, m)]
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, make(module, g))
    return [n for n, _ in chosen]


def add_lora(model: nn.Module, rank: int, seed: int) -> list[str]:
    """Wrap every adapted layer (:data:`ADAPTED_SUFFIXES`) of ``model`` with a LoRA, in place."""
    return _wrap(
        model, seed, lambda m, g: LoraLinear(m, rank, g) if isinstance(m, nn.Linear) else LoraConv2d(m, rank, g)
    )


def collect_lora(model: nn.Module) -> dict[str, LoraFactors]:
    """``{model key: LoraFactors}`` of every LoRA wrapper (keys end in ``.weight``)."""
    return {
        f"{name}.weight": module.factors()
        for name, module in model.named_modules()
        if isinstance(module, LoraLinear | LoraConv2d)
    }


def kron_split(n: int) -> tuple[int, int]:
    """``(small, large)`` with ``small · large = n``, as balanced as ``n``'s divisors allow.

    The split LyCORIS's LoKr makes of each side of a weight at its default ``factor=-1``
    (``lycoris.functional.factorization``): the largest divisor of ``n`` not above √n, and its
    cofactor — 32 → (4, 8), 64 → (8, 8), 96 → (8, 12), 128 → (8, 16), 256 → (16, 16).
    """
    small = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return small, n // small


class _ProductAdapter(nn.Module, abc.ABC):
    """A LyCORIS adapter on a frozen ``nn.Linear``/``nn.Conv2d``: ``y = base(x) + op(x, ΔW)``.

    ``ΔW`` (:meth:`delta`, ``(out, in·kh·kw)`` float32) is formed from the factors on every
    call, as LyCORIS trains and ComfyUI applies these types: a Hadamard or Kronecker product has
    no cheaper exact forward, and here the largest layer is 64 × 576. Subclasses give
    :meth:`delta` and :meth:`parts`, the layer's tensors as an adapter file stores them.
    """

    def __init__(self, base: nn.Linear | nn.Conv2d) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.out_features, self.fan_in = int(base.weight.shape[0]), int(base.weight[0].numel())

    @abc.abstractmethod
    def delta(self) -> torch.Tensor:
        """The exact update on the flattened weight, ``(out, in·kh·kw)``, scale included."""

    @abc.abstractmethod
    def parts(self) -> dict[str, torch.Tensor]:
        """The layer's file tensors by suffix (``{".hada_w1_a": …, ".alpha": …}``), detached copies."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        w = self.delta().reshape(b.weight.shape)
        if isinstance(b, nn.Conv2d):
            return b(x) + F.conv2d(x, w, None, b.stride, b.padding, b.dilation, b.groups)
        return b(x) + F.linear(x, w)


class LohaLayer(_ProductAdapter):
    """LoHa on a Linear or Conv2d: ``ΔW = (up1 down1) ∘ (up2 down2) · alpha / rank``.

    The low-rank Hadamard product of FedPara (Hyeon-Woo et al., arXiv 2108.06098, §3.1, Eq. 3),
    in the layout LyCORIS's ``LohaModule`` (without Tucker) saves and ComfyUI v0.3.75 applies
    (``comfy/weight_adapter/loha.py``): ``hada_w1_a``/``hada_w2_a`` = ``up1``/``up2`` ``(out, r)``,
    ``hada_w1_b``/``hada_w2_b`` = ``down1``/``down2`` ``(r, in·kh·kw)`` — a 3×3 kernel lives in the
    down factors — and the scale ``alpha / hada_w1_b.shape[0]``. ``ΔW`` has rank ≤ r².

    Initialised as LyCORIS does: ``up1 ~ N(0, 0.1²)``, ``down1, down2 ~ N(0, 1)`` and ``up2 = 0``,
    so the adapter starts as the base layer. ``alpha = rank`` (scale 1), as the LoRAs here.
    """

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, generator: torch.Generator) -> None:
        super().__init__(base)
        m, n = self.out_features, self.fan_in
        self.up1 = nn.Parameter(0.1 * torch.randn(m, rank, generator=generator))
        self.down1 = nn.Parameter(torch.randn(rank, n, generator=generator))
        self.up2 = nn.Parameter(torch.zeros(m, rank))  # zero: starts as the base layer
        self.down2 = nn.Parameter(torch.randn(rank, n, generator=generator))
        self.alpha = float(rank)

    def delta(self) -> torch.Tensor:
        return (self.up1 @ self.down1) * (self.up2 @ self.down2) * (self.alpha / self.down1.shape[0])

    def parts(self) -> dict[str, torch.Tensor]:
        tensors = {".hada_w1_a": self.up1, ".hada_w1_b": self.down1, ".hada_w2_a": self.up2, ".hada_w2_b": self.down2}
        return {k: v.detach().clone() for k, v in tensors.items()} | {".alpha": torch.tensor(self.alpha)}


class LokrLayer(_ProductAdapter):
    """LoKr on a Linear or Conv2d: ``ΔW = block ⊗ (up2 down2) · alpha / dim``.

    The Kronecker adapter of LyCORIS (Yeh et al., arXiv 2309.14859, §3.3) as its ``LokrModule``
    makes it at ``factor=-1`` with a factored second block, and ComfyUI v0.3.75 applies it
    (``comfy/weight_adapter/lokr.py``): each side of the weight is split by :func:`kron_split`,
    ``out = a·b`` and ``in = c·d``; ``lokr_w1`` = ``block`` ``(a, c)`` is a small full matrix,
    ``lokr_w2_a`` = ``up2`` ``(b, dim)``, ``lokr_w2_b`` = ``down2`` ``(dim, d·kh·kw)`` — a 3×3
    kernel lives in the second block's down factor — and the scale is ``alpha / dim``.
    ``ΔW`` has rank ≤ ``min(a, c) · dim``.

    Initialised as LyCORIS does: ``block`` and ``up2`` Kaiming-uniform (``a = √5``), ``down2 = 0``,
    so the adapter starts as the base layer. ``alpha = dim`` (scale 1), as the LoRAs here.

    Raises:
        ValueError: ``dim ≥ max(b, d) / 2``, where LyCORIS stores ``lokr_w2`` as a full matrix instead.
    """

    def __init__(self, base: nn.Linear | nn.Conv2d, dim: int, generator: torch.Generator) -> None:
        super().__init__(base)
        in_channels = int(base.weight.shape[1])
        kernel = self.fan_in // in_channels
        (a, b), (c, d) = kron_split(self.out_features), kron_split(in_channels)
        if dim >= max(b, d) / 2:
            raise ValueError(
                f"LoKr dim {dim} on a {self.out_features}×{in_channels} layer: LyCORIS stores lokr_w2 full when "
                f"dim ≥ max({b}, {d}) / 2; use dim < {max(b, d) / 2:g}"
            )
        self.block = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(a, c), a=math.sqrt(5), generator=generator))
        self.up2 = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(b, dim), a=math.sqrt(5), generator=generator))
        self.down2 = nn.Parameter(torch.zeros(dim, d * kernel))  # zero: starts as the base layer
        self.alpha = float(dim)

    def delta(self) -> torch.Tensor:
        return torch.kron(self.block, self.up2 @ self.down2) * (self.alpha / self.down2.shape[0])

    def parts(self) -> dict[str, torch.Tensor]:
        tensors = {".lokr_w1": self.block, ".lokr_w2_a": self.up2, ".lokr_w2_b": self.down2}
        return {k: v.detach().clone() for k, v in tensors.items()} | {".alpha": torch.tensor(self.alpha)}


#: The LyCORIS adapter kinds the benchmark trains, by ``kind`` name.
LYCORIS_KINDS: dict[str, type[LohaLayer] | type[LokrLayer]] = {"loha": LohaLayer, "lokr": LokrLayer}


def add_lycoris(model: nn.Module, kind: str, rank: int, seed: int) -> list[str]:
    """Wrap every adapted layer of ``model`` with a LoHa (``rank`` = r) or LoKr (``rank`` = dim), in place."""
    cls = LYCORIS_KINDS[kind]
    return _wrap(model, seed, lambda m, g: cls(m, rank, g))


def lycoris_layer(key: str, parts: Mapping[str, torch.Tensor]) -> LycorisLayer:
    """The core's own reading (``build_lycoris``) of one layer's file tensors, as it reads a user's file.

    Raises:
        ValueError: the core does not read them as a LoHa/LoKr layer (its reason is in the message).
    """
    layer = build_lycoris(key, parts)
    if not isinstance(layer, LycorisLayer):
        raise ValueError(
            f"benchmark adapter layer {key}: lorax_core.lycoris.build_lycoris did not read its tensors "
            f"({', '.join(sorted(parts))}) as a LoHa/LoKr layer: {layer}; the cached adapter is damaged, delete it"
        )
    return layer


def collect_lycoris(model: nn.Module) -> dict[str, LycorisLayer]:
    """``{model key: LycorisLayer}`` of every LoHa/LoKr wrapper, as the core reads it (keys end in ``.weight``)."""
    return {
        f"{name}.weight": lycoris_layer(f"{name}.weight", module.parts())
        for name, module in model.named_modules()
        if isinstance(module, _ProductAdapter)
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

    ``kind`` is ``lora`` (standard LoRA of rank ``rank``), ``lorax`` (LoRA-X with a diagonal
    ΔΣ on the top-``rank`` singular bases, :mod:`lorax_core.lorax_module`), ``loha`` (LoHa of
    rank ``rank``, :class:`LohaLayer`) or ``lokr`` (LoKr with a second block of rank ``rank``,
    :class:`LokrLayer`); LoHa/LoKr layers come back as the core reads their file tensors
    (:class:`~lorax_core.lycoris.LycorisLayer`). The data is the base domain rendered in
    ``style`` for every class.
    """
    model = ToyLDM(base.config, base.depths)
    model.load_state_dict(base.state_dict())
    for p in model.parameters():
        p.requires_grad_(False)
    if kind == "lora":
        add_lora(model, rank, seed)
    elif kind in LYCORIS_KINDS:
        add_lycoris(model, kind, rank, seed)
    else:
        add_lorax(model, include=_adapted, rank=rank)

    def batch_fn(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return data.sample_batch(b, "base", style, g)

    train_diffusion(model, text, diffusion, batch_fn, steps=steps, batch=batch, lr=lr, seed=seed)
    if kind == "lora":
        return collect_lora(model)
    return collect_lycoris(model) if kind in LYCORIS_KINDS else collect_lorax(model)


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
