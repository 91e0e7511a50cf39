"""Tensor names and shapes of the SD1.5 and SDXL UNets, derived from their published configs.

The layout is the original LDM/SGM ``openaimodel.UNetModel`` (the keys of a ComfyUI
"diffusion model" file, without the ``model.diffusion_model.`` prefix of a full checkpoint).
The configs are the ones ComfyUI's ``model_detection.py`` lists for SD15 and SDXL. The output
was checked once against ComfyUI v0.3.75's ``UNetModel`` built on the meta device: same 686
(SD1.5) and 1680 (SDXL) keys, same shapes, 859,520,964 and 2,567,463,684 parameters. This
module does not import ComfyUI.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CONFIGS", "UNetConfig", "lora_layer_keys", "unet_shapes"]


@dataclass(frozen=True)
class UNetConfig:
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    transformer_depth: tuple[int, ...]  # per input ResBlock, level-major
    transformer_depth_middle: int
    # per output ResBlock, consumed from the END (ComfyUI pops it), i.e. the deepest level is last
    transformer_depth_output: tuple[int, ...]
    context_dim: int
    use_linear_in_transformer: bool
    adm_in_channels: int | None
    in_channels: int = 4
    out_channels: int = 4


CONFIGS: dict[str, UNetConfig] = {
    "sd15": UNetConfig(
        model_channels=320,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=(2, 2, 2, 2),
        transformer_depth=(1, 1, 1, 1, 1, 1, 0, 0),
        transformer_depth_middle=1,
        transformer_depth_output=(1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0),
        context_dim=768,
        use_linear_in_transformer=False,
        adm_in_channels=None,
    ),
    "sdxl": UNetConfig(
        model_channels=320,
        channel_mult=(1, 2, 4),
        num_res_blocks=(2, 2, 2),
        transformer_depth=(0, 0, 2, 2, 10, 10),
        transformer_depth_middle=10,
        transformer_depth_output=(0, 0, 0, 2, 2, 2, 10, 10, 10),
        context_dim=2048,
        use_linear_in_transformer=True,
        adm_in_channels=2816,
    ),
    # A few small layers with SD1.5's layout, for the harness smoke test (tests/perf).
    "tiny": UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=(1, 1),
        transformer_depth=(1, 1),
        transformer_depth_middle=1,
        transformer_depth_output=(1, 1, 1, 1),
        context_dim=48,
        use_linear_in_transformer=False,
        adm_in_channels=None,
    ),
}

Shapes = dict[str, tuple[int, ...]]


def _linear(out: Shapes, name: str, n_out: int, n_in: int, bias: bool = True) -> None:
    out[f"{name}.weight"] = (n_out, n_in)
    if bias:
        out[f"{name}.bias"] = (n_out,)


def _conv(out: Shapes, name: str, n_out: int, n_in: int, k: int) -> None:
    out[f"{name}.weight"] = (n_out, n_in, k, k)
    out[f"{name}.bias"] = (n_out,)


def _norm(out: Shapes, name: str, ch: int) -> None:
    out[f"{name}.weight"] = (ch,)
    out[f"{name}.bias"] = (ch,)


def _resblock(out: Shapes, name: str, ch: int, ch_out: int, emb: int) -> None:
    _norm(out, f"{name}.in_layers.0", ch)
    _conv(out, f"{name}.in_layers.2", ch_out, ch, 3)
    _linear(out, f"{name}.emb_layers.1", ch_out, emb)
    _norm(out, f"{name}.out_layers.0", ch_out)
    _conv(out, f"{name}.out_layers.3", ch_out, ch_out, 3)
    if ch != ch_out:
        _conv(out, f"{name}.skip_connection", ch_out, ch, 1)


def _transformer(out: Shapes, name: str, ch: int, depth: int, cfg: UNetConfig) -> None:
    _norm(out, f"{name}.norm", ch)
    if cfg.use_linear_in_transformer:
        _linear(out, f"{name}.proj_in", ch, ch)
    else:
        _conv(out, f"{name}.proj_in", ch, ch, 1)
    for d in range(depth):
        b = f"{name}.transformer_blocks.{d}"
        for attn, ctx in (("attn1", ch), ("attn2", cfg.context_dim)):
            _linear(out, f"{b}.{attn}.to_q", ch, ch, bias=False)
            _linear(out, f"{b}.{attn}.to_k", ch, ctx, bias=False)
            _linear(out, f"{b}.{attn}.to_v", ch, ctx, bias=False)
            _linear(out, f"{b}.{attn}.to_out.0", ch, ch)
        _linear(out, f"{b}.ff.net.0.proj", ch * 8, ch)  # GEGLU: two 4·ch halves
        _linear(out, f"{b}.ff.net.2", ch, ch * 4)
        for norm in ("norm1", "norm2", "norm3"):
            _norm(out, f"{b}.{norm}", ch)
    if cfg.use_linear_in_transformer:
        _linear(out, f"{name}.proj_out", ch, ch)
    else:
        _conv(out, f"{name}.proj_out", ch, ch, 1)


def unet_shapes(family: str) -> Shapes:
    """``{tensor name: shape}`` of one UNet (``"sd15"``, ``"sdxl"`` or ``"tiny"``), in module order."""
    cfg = CONFIGS[family]
    mc = cfg.model_channels
    emb = mc * 4
    out: Shapes = {}
    _linear(out, "time_embed.0", emb, mc)
    _linear(out, "time_embed.2", emb, emb)
    if cfg.adm_in_channels is not None:
        _linear(out, "label_emb.0.0", emb, cfg.adm_in_channels)
        _linear(out, "label_emb.0.2", emb, emb)
    _conv(out, "input_blocks.0.0", mc, cfg.in_channels, 3)
    skips = [mc]
    ch, block, res = mc, 1, 0
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks[level]):
            _resblock(out, f"input_blocks.{block}.0", ch, mult * mc, emb)
            ch = mult * mc
            if cfg.transformer_depth[res] > 0:
                _transformer(out, f"input_blocks.{block}.1", ch, cfg.transformer_depth[res], cfg)
            skips.append(ch)
            block, res = block + 1, res + 1
        if level != len(cfg.channel_mult) - 1:
            _conv(out, f"input_blocks.{block}.0.op", ch, ch, 3)
            skips.append(ch)
            block += 1
    _resblock(out, "middle_block.0", ch, ch, emb)
    _transformer(out, "middle_block.1", ch, cfg.transformer_depth_middle, cfg)
    _resblock(out, "middle_block.2", ch, ch, emb)
    block = 0
    depth_output = list(cfg.transformer_depth_output)
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks[level] + 1):
            _resblock(out, f"output_blocks.{block}.0", ch + skips.pop(), mult * mc, emb)
            ch = mult * mc
            part = 1
            depth = depth_output.pop()
            if depth > 0:
                _transformer(out, f"output_blocks.{block}.1", ch, depth, cfg)
                part = 2
            if level and i == cfg.num_res_blocks[level]:
                _conv(out, f"output_blocks.{block}.{part}.conv", ch, ch, 3)
            block += 1
    _norm(out, "out.0", mc)
    _conv(out, "out.2", cfg.out_channels, mc, 3)
    return out


#: The layers a typical kohya LoRA trains: every attention projection and feed-forward linear.
LORA_SUFFIXES = (
    "attn1.to_q.weight",
    "attn1.to_k.weight",
    "attn1.to_v.weight",
    "attn1.to_out.0.weight",
    "attn2.to_q.weight",
    "attn2.to_k.weight",
    "attn2.to_v.weight",
    "attn2.to_out.0.weight",
    "ff.net.0.proj.weight",
    "ff.net.2.weight",
)


def lora_layer_keys(shapes: Shapes) -> list[str]:
    """The tensor names a LoRA on every attention projection and feed-forward layer patches."""
    return [k for k in shapes if ".transformer_blocks." in k and k.endswith(LORA_SUFFIXES)]
