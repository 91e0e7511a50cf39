"""The naming tables of every LoRA format: the only place key suffixes and prefixes are spelled out.

A LoRA file key is ``<layer name><suffix>``. The suffix says which tensor of the layer it is
(``down``, ``up``, ``alpha``, or a part of an adapter type we cannot transfer); the layer name
is the file's own name for the module (``lora_unet_…``, ``diffusion_model.…``, ``unet.…``).
The handlers in this package and :mod:`.resolve` read these tables; nothing else spells a key.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ADAPTER_METADATA_KEY",
    "ALPHA_SUFFIX",
    "COMFY_PREFIXES",
    "COMFY_STYLE",
    "DIFFUSERS_ATTENTION_SPELLINGS",
    "DIFFUSERS_BLOCK_MARKERS",
    "DIFFUSERS_COMPONENTS",
    "DORA_SUFFIX",
    "FULL_SUFFIXES",
    "KOHYA_PREFIXES",
    "KOHYA_STYLE",
    "KOHYA_TEXT_ENCODERS",
    "LOHA_SUFFIXES",
    "LOKR_SUFFIXES",
    "LORAX_CORE_SUFFIX",
    "LORAX_SHAPE_SUFFIX",
    "LYCORIS_SUFFIXES",
    "MID_SUFFIX",
    "MODEL_KEY_PREFIXES",
    "PAIR_STYLES",
    "PEFT_PREFIXES",
    "PEFT_STYLE",
    "PEFT_WRAPPER",
    "TEXT_MODEL_SPELLINGS",
    "UNSUPPORTED_SUFFIXES",
    "KeyStyle",
    "split_key",
]


@dataclass(frozen=True)
class KeyStyle:
    """How one layer's tensors are spelled in a file, so a writer can spell them the same way.

    Attributes:
        down: suffix of the ``(r, in)`` factor, e.g. ``".lora_down.weight"``.
        up: suffix of the ``(out, r)`` factor, e.g. ``".lora_up.weight"``.
        alpha: whether the layer carried an ``.alpha`` scalar (written back as ``alpha = rank``).
    """

    down: str
    up: str
    alpha: bool = True


# (down, up) suffix pairs. kohya sd-scripts / LyCORIS LoCon / ComfyUI use lora_down/lora_up;
# PEFT and diffusers use lora_A (= down) / lora_B (= up), optionally with PEFT's adapter name
# ("default"); older diffusers attention processors used ".lora.down/.lora.up".
KOHYA_STYLE = KeyStyle(".lora_down.weight", ".lora_up.weight", alpha=True)
COMFY_STYLE = KOHYA_STYLE
PEFT_STYLE = KeyStyle(".lora_A.weight", ".lora_B.weight", alpha=False)
PAIR_STYLES: tuple[KeyStyle, ...] = (
    KOHYA_STYLE,
    PEFT_STYLE,
    KeyStyle(".lora_A.default.weight", ".lora_B.default.weight", alpha=False),
    KeyStyle(".lora.down.weight", ".lora.up.weight", alpha=False),
    KeyStyle("_lora.down.weight", "_lora.up.weight", alpha=False),
    KeyStyle(".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight", alpha=False),
)
ALPHA_SUFFIX = ".alpha"

# This project's LoRA-X format (see docs/FORMATS.md): a core (R,) or (R, R) and the base
# weight's shape as an int64 vector.
LORAX_CORE_SUFFIX = ".lorax_core"
LORAX_SHAPE_SUFFIX = ".lorax_shape"

# LyCORIS and related types, read by lorax_core.lycoris (ComfyUI comfy/weight_adapter/loha.py,
# lokr.py, lora.py; the .diff/.diff_b patches of comfy/lora.py).
LOHA_SUFFIXES: tuple[str, ...] = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2")
LOKR_SUFFIXES: tuple[str, ...] = (
    ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
)  # fmt: skip
FULL_SUFFIXES: tuple[str, ...] = (".diff", ".diff_b")
DORA_SUFFIX = ".dora_scale"
MID_SUFFIX = ".lora_mid.weight"
LYCORIS_SUFFIXES: tuple[str, ...] = (*LOHA_SUFFIXES, *LOKR_SUFFIXES, *FULL_SUFFIXES, DORA_SUFFIX, MID_SUFFIX)

# Tensor suffixes of adapter types whose ΔW is not ``up @ down`` (or that need more than the
# factors) and that no reader here understands, with the reason shown per layer. Checked by
# longest match.
_FULL = "full weight patch (.set_weight/norms): not a low-rank adapter; not transferable"
UNSUPPORTED_SUFFIXES: dict[str, str] = {
    ".set_weight": _FULL,
    ".w_norm": _FULL,
    ".b_norm": _FULL,
    ".reshape_weight": "weight reshape patch (reshape_weight): not transferable",
    ".oft_blocks": "OFT adapter (oft_blocks): an orthogonal rotation, not up·down; not transferable",
    ".rescale": "OFT adapter (rescale): an orthogonal rotation, not up·down; not transferable",
    ".a1.weight": "GLoRA adapter (a1/a2/b1/b2): not transferable",
    ".a2.weight": "GLoRA adapter (a1/a2/b1/b2): not transferable",
    ".b1.weight": "GLoRA adapter (a1/a2/b1/b2): not transferable",
    ".b2.weight": "GLoRA adapter (a1/a2/b1/b2): not transferable",
    ".lora_B.bias": "bias patch (lora_B.bias): biases are not low-rank; not transferable",
    ".lora_up.bias": "bias patch (lora_up.bias): biases are not low-rank; not transferable",
}

# Layer-name prefixes. kohya / A1111: one prefix per model part, dots turned into underscores.
KOHYA_PREFIXES: tuple[str, ...] = (
    "lora_unet_",
    "lora_te1_",
    "lora_te2_",
    "lora_te3_",
    "lora_te_",
    "lora_transformer_",
    "lycoris_",
)
# kohya text-encoder prefix → the text encoder it names in the model-key namespace of
# lorax_core.modelio (``text_encoders.<name>.…``). ``lora_te_`` is the single encoder of
# SD1.x (CLIP-L) or SD2.x (OpenCLIP-H).
KOHYA_TEXT_ENCODERS: dict[str, tuple[str, ...]] = {
    "lora_te_": ("clip_l", "clip_h"),
    "lora_te1_": ("clip_l",),
    "lora_te2_": ("clip_g",),
}
# ComfyUI-native (LoraSave, the trainer): the model key without ".weight".
COMFY_PREFIXES: tuple[str, ...] = ("diffusion_model.", "text_encoders.")
# diffusers / PEFT wrappers around the module path.
PEFT_PREFIXES: tuple[str, ...] = (
    "base_model.model.",
    "unet.",
    "transformer.",
    "text_encoder_2.",
    "text_encoder.",
)
# PEFT's wrapper around a model (``PeftModel.state_dict()``; also after a component prefix,
# ``unet.base_model.model.…``): not part of the module path.
PEFT_WRAPPER = "base_model.model."
# The pipeline components diffusers prefixes LoRA keys and ``lora_adapter_metadata`` fields with.
DIFFUSERS_COMPONENTS: tuple[str, ...] = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
# diffusers/PEFT's metadata key holding the adapter's LoraConfig as JSON (diffusers
# ``loaders/lora_base.py`` LORA_ADAPTER_METADATA_KEY).
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
# Attention projections: PEFT names the module (``attn1.to_q``, ``attn1.to_out.0``); ComfyUI's
# key map (comfy/lora.py model_lora_keys_unet) spells the old attention-processor form
# (``attn1.processor.to_q``, ``attn1.processor.to_out``). (PEFT tail, ComfyUI tail) pairs.
DIFFUSERS_ATTENTION_SPELLINGS: tuple[tuple[str, str], ...] = (
    (".to_q", ".processor.to_q"),
    (".to_k", ".processor.to_k"),
    (".to_v", ".processor.to_v"),
    (".to_out.0", ".processor.to_out"),
)
# CLIP text encoders: transformers 5 dropped the ``text_model`` wrapper from ``CLIPTextModel``
# (``text_encoder.encoder.layers.N``, and after diffusers' convert_state_dict_to_kohya
# ``lora_te1_encoder_layers_N``); transformers 4, kohya and ComfyUI spell
# ``text_encoder.text_model.encoder.layers.N`` / ``lora_te1_text_model_encoder_layers_N``.
# (transformers-5 head, classic head) pairs.
TEXT_MODEL_SPELLINGS: tuple[tuple[str, str], ...] = (
    ("text_encoder.encoder.", "text_encoder.text_model.encoder."),
    ("text_encoder_2.encoder.", "text_encoder_2.text_model.encoder."),
    ("lora_te_encoder_", "lora_te_text_model_encoder_"),
    ("lora_te1_encoder_", "lora_te1_text_model_encoder_"),
    ("lora_te2_encoder_", "lora_te2_text_model_encoder_"),
)
# The top-level namespaces of model keys (lorax_core.modelio).
MODEL_KEY_PREFIXES: tuple[str, ...] = ("diffusion_model.", "text_encoders.")
# Substrings that mark diffusers block names (down_blocks.0.attentions.0…), which map to the
# original UNet layout only through ComfyUI's per-family tables.
DIFFUSERS_BLOCK_MARKERS: tuple[str, ...] = (
    "down_blocks",
    "up_blocks",
    "mid_block",
    "text_model_encoder_layers",
    "text_model.encoder.layers",
)


def _known_suffixes() -> tuple[str, ...]:
    suffixes = {ALPHA_SUFFIX, LORAX_CORE_SUFFIX, LORAX_SHAPE_SUFFIX, *UNSUPPORTED_SUFFIXES, *LYCORIS_SUFFIXES}
    for style in PAIR_STYLES:
        suffixes.update((style.down, style.up))
    # Longest first, so ".lora_A.default.weight" is tried before ".lora_A.weight"-like tails.
    return tuple(sorted(suffixes, key=len, reverse=True))


_SUFFIXES = _known_suffixes()


def split_key(key: str) -> tuple[str, str] | None:
    """Split a file key into ``(layer name, suffix)`` by the longest known suffix.

    Returns ``None`` for a key with no known suffix (reported by the reader as unrecognised).
    An empty layer name (the key *is* a suffix) is also ``None``.
    """
    for suffix in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], suffix
    return None
