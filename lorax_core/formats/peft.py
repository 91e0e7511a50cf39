"""diffusers / PEFT naming: ``<prefix><module path>.lora_A.weight`` (down, (r, in)) and
``.lora_B.weight`` (up, (out, r)), and the scale diffusers reads from ``lora_adapter_metadata``.

Prefixes ``unet.``, ``transformer.``, ``text_encoder.``, ``text_encoder_2.`` and
``base_model.model.`` are kept in the layer name (so a file is written back with the same keys);
:mod:`.resolve` strips them. PEFT's adapter name (``.lora_A.default.weight``) and the older
diffusers attention-processor forms (``.lora.down.weight``, ``_lora.down.weight``,
``.lora_linear_layer.down.weight``) are read too.

Scale. PEFT keeps ``lora_alpha`` in its ``LoraConfig``, not in the tensors. diffusers ≥ 0.35
writes that config into the safetensors metadata key ``lora_adapter_metadata`` (a JSON object;
a pipeline's ``save_lora_weights`` prefixes each field with the component, ``"unet.r"``,
``"text_encoder.lora_alpha"``), and ``load_lora_weights`` builds ``LoraConfig(**fields)`` from it
(diffusers ``utils/peft_utils._create_lora_config``), so each module gets PEFT's
``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``; per module through
``rank_pattern``/``alpha_pattern``; peft ``tuners/lora/layer.py update_layer``). Without that key
diffusers uses ``lora_alpha = r`` (scale 1; ``get_peft_kwargs``). :func:`metadata_alphas` turns
the metadata into per-layer kohya-style alphas (``alpha / rank`` = that scaling);
:func:`rewrite_adapter_metadata` writes metadata that matches the tensors actually written.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping

from ..types import AdapterLayer
from .base import LayerParts, build_pair, pair_style
from .keys import (
    ADAPTER_METADATA_KEY,
    DIFFUSERS_COMPONENTS,
    KOHYA_STYLE,
    PEFT_PREFIXES,
    PEFT_STYLE,
    PEFT_WRAPPER,
    KeyStyle,
)

__all__ = ["PeftHandler", "metadata_alphas", "rewrite_adapter_metadata"]

AdapterConfigs = dict[str, dict[str, object]]
"""``{component ("unet", "text_encoder", …, or "" for an unprefixed file): LoraConfig fields}``."""


class PeftHandler:
    """Claims layers spelled with lora_A/lora_B (or older diffusers pairs), or under a PEFT prefix."""

    name = "peft"
    default_style = PEFT_STYLE

    def claims(self, layer: str, parts: LayerParts) -> bool:
        style = pair_style(parts)
        if style is not None:
            return style != KOHYA_STYLE
        return layer.startswith(PEFT_PREFIXES)

    def build(self, layer: str, parts: LayerParts) -> tuple[AdapterLayer, KeyStyle] | str:
        return build_pair(layer, parts)


def _adapter_configs(metadata: Mapping[str, str]) -> AdapterConfigs | None:
    """The ``lora_adapter_metadata`` JSON split per diffusers component, or ``None`` if absent/unreadable."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if raw is None:
        return None
    try:
        fields = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(fields, dict):
        return None
    configs: AdapterConfigs = {}
    for key, value in fields.items():
        component, _, field = str(key).partition(".")
        if field and component in DIFFUSERS_COMPONENTS:
            configs.setdefault(component, {})[field] = value
        else:
            configs.setdefault("", {})[str(key)] = value
    return configs


def _split_layer(layer: str) -> tuple[str, str]:
    """``(component, PEFT module name)`` of a layer name: ``unet.down_blocks.0…`` → ``("unet", "down_blocks.0…")``."""
    component, _, rest = layer.partition(".")
    if rest and component in DIFFUSERS_COMPONENTS:
        module = rest
    else:
        component, module = "", layer
    return component, module.removeprefix(PEFT_WRAPPER)


def _pattern_value(patterns: object, module: str) -> object | None:
    """PEFT's ``get_pattern_key``: the value of the first pattern ``p`` with ``(.*\\.)?(p)$`` matching ``module``."""
    if not isinstance(patterns, dict):
        return None
    for pattern, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        except re.error:
            continue
    return None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) and number > 0 else None


def metadata_alphas(layers: Mapping[str, AdapterLayer], metadata: Mapping[str, str]) -> dict[str, float]:
    """Per-layer alphas that make ``alpha / rank`` equal diffusers' PEFT scaling from ``lora_adapter_metadata``.

    Args:
        layers: PEFT-style layers without an ``.alpha`` tensor (name → factors; only ``rank`` is read).
        metadata: the file's string metadata.

    Returns:
        ``{layer name: alpha}`` for the layers whose component has a config with a positive ``r``
        and ``lora_alpha``; empty when the file has no (readable) ``lora_adapter_metadata``.
    """
    configs = _adapter_configs(metadata)
    if not configs:
        return {}
    out: dict[str, float] = {}
    for name, layer in layers.items():
        component, module = _split_layer(name)
        config = configs.get(component, configs.get(""))
        if config is None:
            continue
        r = _number(_pattern_value(config.get("rank_pattern"), module) or config.get("r"))
        lora_alpha = _number(_pattern_value(config.get("alpha_pattern"), module) or config.get("lora_alpha"))
        if r is None or lora_alpha is None:
            continue
        scale = lora_alpha / math.sqrt(r) if config.get("use_rslora") is True else lora_alpha / r
        out[name] = scale * layer.rank
    return out


# Config fields that select modules by other means than their names; the rewritten config names
# every written module in ``target_modules``, so these would only filter them out again.
_SELECTOR_FIELDS = ("layers_to_transform", "layers_pattern", "exclude_modules", "target_parameters")


def rewrite_adapter_metadata(
    metadata: Mapping[str, str], written: Mapping[str, int], *, has_alpha_layers: bool
) -> dict[str, str]:
    """``metadata`` with ``lora_adapter_metadata`` describing what was written, or without it.

    Args:
        metadata: the metadata about to be written (string values).
        written: ``{layer name: rank}`` of the LoRA layers written in an alpha-less (PEFT) style;
            their scale is folded into ``lora_B``, so diffusers must use scaling 1 (``lora_alpha = r``).
        has_alpha_layers: some layer was written with an ``.alpha`` tensor. diffusers refuses a file
            with both alphas and ``lora_adapter_metadata`` (``load_lora_adapter``: "Both
            `network_alphas` and `metadata` cannot be specified"), and the key would describe
            nothing it reads, so it is dropped.

    Returns:
        A copy of ``metadata``. Per component, the source config is kept except ``r`` (the most
        common written rank), ``lora_alpha = r``, ``rank_pattern``/``alpha_pattern`` (the other
        ranks, alpha = rank), ``use_rslora = False``, ``target_modules`` (the written module
        names) and the selector fields, cleared. Fields are re-prefixed as diffusers wrote them.
    """
    out = dict(metadata)
    configs = _adapter_configs(metadata)
    if configs is None:
        return out
    del out[ADAPTER_METADATA_KEY]
    if has_alpha_layers or not written:
        return out
    ranks: dict[str, dict[str, int]] = {}
    for name, rank in written.items():
        component, module = _split_layer(name)
        ranks.setdefault(component, {})[module] = rank
    fields: dict[str, object] = {}
    for component, modules in ranks.items():
        config = dict(configs.get(component, configs.get("", {})))
        r = Counter(modules.values()).most_common(1)[0][0]
        pattern = {module: rank for module, rank in sorted(modules.items()) if rank != r}
        config.update(
            r=r,
            lora_alpha=r,
            rank_pattern=pattern,
            alpha_pattern=dict(pattern),
            use_rslora=False,
            target_modules=sorted(modules),
        )
        config.update(dict.fromkeys(_SELECTOR_FIELDS))
        fields.update({(f"{component}.{k}" if component else k): v for k, v in config.items()})
    out[ADAPTER_METADATA_KEY] = json.dumps(fields, indent=2, sort_keys=True)
    return out
