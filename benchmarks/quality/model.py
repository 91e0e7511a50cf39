"""A tiny conditional diffusion UNet with Stable Diffusion's layer kinds and parameter names.

The network mirrors the LDM/SD-1.x ``UNetModel`` layout at toy scale so that a transfer meets
the same kinds of layers it meets in a real checkpoint:

* ``time_embed.{0,2}`` linear layers; ``input_blocks`` / ``middle_block`` / ``output_blocks``
  made of ``ResBlock`` (``in_layers.2`` and ``out_layers.3`` 3×3 convs, ``emb_layers.1``
  linear, ``skip_connection`` 1×1 conv), ``SpatialTransformer`` (``proj_in``/``proj_out`` 1×1
  convs, ``transformer_blocks.i.attn1`` self-attention and ``attn2`` cross-attention with
  ``to_q/to_k/to_v/to_out.0``, GEGLU feed-forward ``ff.net.0.proj`` / ``ff.net.2``),
  ``Downsample.op`` / ``Upsample.conv``; ``out.2`` final conv.
* State-dict keys start with ``diffusion_model.`` like ComfyUI's model keys.

Pixel (un)shuffle by 2 plays the VAE: a 3×16×16 image is a 12×8×8 "latent". The "text
encoder" is a frozen, seeded embedding table (4 tokens of width 32 per class, plus a null
prompt for classifier-free guidance) shared by every base model, as CLIP is shared by SD-1.5
and its fine-tunes.

All tensors are float32 on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "Diffusion",
    "ModelConfig",
    "TextEncoder",
    "ToyLDM",
    "ddim_sample",
    "permute_internal_bases",
    "to_image",
    "to_latent",
]


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the toy UNet. ``depths``: transformer blocks in each of the five SpatialTransformers."""

    channels: tuple[int, int] = (32, 64)
    depths: tuple[int, int, int, int, int] = (1, 2, 2, 2, 1)
    heads: int = 4
    context_dim: int = 32
    context_tokens: int = 4
    num_classes: int = 4
    ff_mult: int = 2
    latent_channels: int = 12


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(8, ch)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding ``(B,) -> (B, dim)`` as in the LDM code base."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """SD's ``ResBlock``: GN → SiLU → conv, + time embedding, GN → SiLU → dropout → conv, skip."""

    def __init__(self, ch_in: int, ch_out: int, emb_dim: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(_norm(ch_in), nn.SiLU(), nn.Conv2d(ch_in, ch_out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, ch_out))
        self.out_layers = nn.Sequential(
            _norm(ch_out), nn.SiLU(), nn.Identity(), nn.Conv2d(ch_out, ch_out, 3, padding=1)
        )
        self.skip_connection: nn.Module = nn.Identity() if ch_in == ch_out else nn.Conv2d(ch_in, ch_out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """``attn1``/``attn2``: ``to_q``/``to_k``/``to_v`` without bias, ``to_out.0`` with bias."""

    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Identity())

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.reshape(b, -1, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class GEGLU(nn.Module):
    """``ff.net.0``: one linear ``proj`` to twice the inner width, gated by GELU."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, ff_mult: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)
        self.ff = FeedForward(dim, ff_mult)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn1(h, h)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """SD-1.x ``SpatialTransformer``: GN, 1×1 conv ``proj_in``, ``depth`` blocks, 1×1 conv ``proj_out``."""

    def __init__(self, ch: int, cfg: ModelConfig, depth: int) -> None:
        super().__init__()
        self.norm = _norm(ch)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(ch, cfg.context_dim, cfg.heads, cfg.ff_mult) for _ in range(depth)
        )
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(h.transpose(1, 2).reshape(b, c, hgt, wid))


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ConvIn(nn.Module):
    def __init__(self, ch_in: int, ch_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch_in, ch_out, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class TimestepSequential(nn.ModuleList):
    """One ``input_blocks.i`` / ``output_blocks.i`` entry: children called with (x, emb, context)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb, context)
        return x


class UNet(nn.Module):
    """The ``diffusion_model``: two resolutions (8×8 and 4×4 latents), transformers at both.

    ``depths`` gives the transformer depth of the five SpatialTransformers in order
    (input 1, input 3, middle, output 0, output 2); a distilled "shallow" student uses fewer.
    """

    def __init__(self, cfg: ModelConfig, depths: tuple[int, ...]) -> None:
        super().__init__()
        c1, c2 = cfg.channels
        emb = c1 * 2
        self.time_embed = nn.Sequential(nn.Linear(c1, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList(
            [
                TimestepSequential([ConvIn(cfg.latent_channels, c1)]),
                TimestepSequential([ResBlock(c1, c1, emb), SpatialTransformer(c1, cfg, depths[0])]),
                TimestepSequential([Downsample(c1)]),
                TimestepSequential([ResBlock(c1, c2, emb), SpatialTransformer(c2, cfg, depths[1])]),
            ]
        )
        self.middle_block = TimestepSequential([ResBlock(c2, c2, emb), SpatialTransformer(c2, cfg, depths[2])])
        self.output_blocks = nn.ModuleList(
            [
                TimestepSequential([ResBlock(c2 + c2, c2, emb), SpatialTransformer(c2, cfg, depths[3])]),
                TimestepSequential([ResBlock(c2 + c1, c2, emb), Upsample(c2)]),
                TimestepSequential([ResBlock(c2 + c1, c1, emb), SpatialTransformer(c1, cfg, depths[4])]),
                TimestepSequential([ResBlock(c1 + c1, c1, emb)]),
            ]
        )
        self.out = nn.Sequential(_norm(c1), nn.SiLU(), nn.Conv2d(c1, cfg.latent_channels, 3, padding=1))
        self.model_channels = c1

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)


class TextEncoder(nn.Module):
    """Frozen "CLIP": a seeded table of ``context_tokens`` vectors per class (+ one null prompt)."""

    def __init__(self, cfg: ModelConfig, seed: int = 1234) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        table = torch.randn(cfg.num_classes + 1, cfg.context_tokens, cfg.context_dim, generator=g)
        self.register_buffer("table", table)
        self.null_index = cfg.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table[labels]


class ToyLDM(nn.Module):
    """Wrapper whose state-dict keys read ``diffusion_model.…`` like a ComfyUI model's keys."""

    def __init__(self, cfg: ModelConfig, depths: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.depths = depths or cfg.depths
        self.diffusion_model = UNet(cfg, self.depths)

    def forward(self, latent: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.diffusion_model(latent, t, context)


def _group_permutation(channels: int, groups: int, g: torch.Generator) -> torch.Tensor:
    """A permutation of ``channels`` that maps every GroupNorm group onto a whole group.

    Shuffles the order of the groups and the channels inside each group, so per-group mean and
    variance, and hence GroupNorm's output up to the same permutation, are unchanged.
    """
    size = channels // groups
    order = torch.randperm(groups, generator=g)
    return torch.cat([order[i] * size + torch.randperm(size, generator=g) for i in range(groups)])


def _head_permutations(dim: int, heads: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Row permutations ``(qk, v)`` of an attention layer that leave its output unchanged.

    Both move whole heads by the same head permutation (a head's query, key and value must stay
    together); inside a head, query and key rows share one shuffle (it cancels in ``q·k``) and
    the value rows get their own (undone by permuting the columns of ``to_out.0``).
    """
    size = dim // heads
    order = torch.randperm(heads, generator=g)
    qk = torch.cat([order[i] * size + torch.randperm(size, generator=g) for i in range(heads)])
    v = torch.cat([order[i] * size + torch.randperm(size, generator=g) for i in range(heads)])
    return qk, v


@torch.no_grad()
def permute_internal_bases(model: ToyLDM, seed: int) -> ToyLDM:
    """A copy of ``model`` with the same function but shuffled hidden units (a change of basis).

    Every attention layer gets its heads (and the dimensions inside each head) permuted, every
    GEGLU feed-forward its inner channels (both halves of ``ff.net.0.proj`` alike, the columns of
    ``ff.net.2`` to match), every ResBlock its hidden channels (``in_layers.2`` outputs and bias,
    ``emb_layers.1``, the ``out_layers.0`` GroupNorm affine parameters by whole groups, and the
    ``out_layers.3`` inputs). Outputs agree with ``model``'s to float32 rounding. The residual
    streams, ``proj_in``/``proj_out`` and the skip paths keep their bases, so the model still
    pairs with ``model`` layer by layer by name, but an adapter's update pushes on the wrong
    hidden units — what a weight-space transfer meets when two checkpoints learned the same
    features in another order.
    """
    g = torch.Generator().manual_seed(seed)
    out = ToyLDM(model.config, model.depths)
    out.load_state_dict(model.state_dict())
    for module in out.modules():
        if isinstance(module, CrossAttention):
            qk, v = _head_permutations(module.to_q.out_features, module.heads, g)
            module.to_q.weight.copy_(module.to_q.weight[qk])
            module.to_k.weight.copy_(module.to_k.weight[qk])
            module.to_v.weight.copy_(module.to_v.weight[v])
            module.to_out[0].weight.copy_(module.to_out[0].weight[:, v])
        elif isinstance(module, FeedForward):
            proj, down = module.net[0].proj, module.net[2]
            inner = down.in_features
            p = torch.randperm(inner, generator=g)
            rows = torch.cat([p, p + inner])  # the value half and its gate move together
            proj.weight.copy_(proj.weight[rows])
            proj.bias.copy_(proj.bias[rows])
            down.weight.copy_(down.weight[:, p])
        elif isinstance(module, ResBlock):
            conv_in, emb = module.in_layers[2], module.emb_layers[1]
            norm, conv_out = module.out_layers[0], module.out_layers[3]
            p = _group_permutation(conv_in.out_channels, norm.num_groups, g)
            for param in (conv_in.weight, conv_in.bias, emb.weight, emb.bias, norm.weight, norm.bias):
                param.copy_(param[p])
            conv_out.weight.copy_(conv_out.weight[:, p])
    return out


def to_latent(images: torch.Tensor) -> torch.Tensor:
    """The toy "VAE encode": ``(B, 3, 16, 16) -> (B, 12, 8, 8)``."""
    return F.pixel_unshuffle(images, 2)


def to_image(latent: torch.Tensor) -> torch.Tensor:
    """The toy "VAE decode": ``(B, 12, 8, 8) -> (B, 3, 16, 16)``."""
    return F.pixel_shuffle(latent, 2)


class Diffusion:
    """DDPM noise schedule (cosine, 1000 steps; Nichol & Dhariwal 2021) with v-prediction.

    v-prediction (Salimans & Ho 2022; SD 2.x) gives clean samples in few DDIM steps from a
    model this small, where ε-prediction leaves visible noise.
    """

    def __init__(self, steps: int = 1000) -> None:
        s = 0.008
        t = torch.arange(steps + 1, dtype=torch.float64) / steps
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        alphas_bar = (f / f[0]).clamp(min=1e-5)
        self.steps = steps
        self.alphas_bar = alphas_bar[1:].float()  # ᾱ_t for t = 1..T stored at index t-1

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        ab = self.alphas_bar[t][:, None, None, None]
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def training_loss(
        self, model: nn.Module, x0: torch.Tensor, context: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Mean-squared v error at uniformly drawn timesteps."""
        t = torch.randint(0, self.steps, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        return F.mse_loss(model(self.add_noise(x0, t, noise), t, context), self.velocity(x0, t, noise))

    def velocity(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The v target ``√ᾱ ε − √(1−ᾱ) x0``."""
        ab = self.alphas_bar[t][:, None, None, None]
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0


@torch.no_grad()
def ddim_sample(
    model: nn.Module,
    diffusion: Diffusion,
    text: TextEncoder,
    labels: torch.Tensor,
    noise: torch.Tensor,
    steps: int = 12,
    guidance: float = 2.0,
) -> torch.Tensor:
    """Deterministic DDIM (η = 0) with classifier-free guidance; returns images ``(B, 3, 16, 16)``.

    ``noise`` ``(B, 12, 8, 8)`` is the initial latent: equal noise and labels give the same
    trajectory up to the model (same prompts, same seeds).
    """
    b = labels.shape[0]
    x = noise
    cond = text(labels)
    uncond = text(torch.full_like(labels, text.null_index))
    context = torch.cat([cond, uncond])
    ts = torch.linspace(diffusion.steps - 1, 0, steps).round().long()
    for i, t in enumerate(ts):
        v_c, v_u = model(torch.cat([x, x]), t.repeat(2 * b), context).chunk(2)
        v = v_u + guidance * (v_c - v_u)
        ab = diffusion.alphas_bar[t]
        ab_prev = diffusion.alphas_bar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        x0 = (ab.sqrt() * x - (1 - ab).sqrt() * v).clamp(-1.2, 1.2)
        eps = (1 - ab).sqrt() * x + ab.sqrt() * v
        x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    return to_image(x).clamp(-1, 1)
