"""Every kind of ComfyUI key-map entry survives the ``--comfyui`` bridge's JSON (issue 22).

ComfyUI's key maps hold whole weights (``"key"``), slices of fused weights
(``(key, (dim, offset, size))``) and converted weights (``(key, None, function)``, e.g. the
adaLN ``norm_out`` layers of Flux/SD3 with ``swap_scale_shift``). The last kind made the bridge's
answer fail with ``TypeError: 'NoneType' object is not iterable`` before any maths.
"""

from __future__ import annotations

import json

from test_comfyui_keymap import _bridge_module

from lorax_core.cli import _decode_target
from lorax_core.formats.resolve import resolve_layers


def swap_scale_shift(weight):  # the name ComfyUI's comfy.utils function has; only its name travels
    return weight


ENTRIES = {
    "whole": "diffusion_model.a.weight",
    "slice": ("diffusion_model.qkv.weight", (0, 64, 32)),
    "converted": ("diffusion_model.final_layer.adaLN_modulation.1.weight", None, swap_scale_shift),
}


def test_every_entry_kind_round_trips_through_json() -> None:
    encode = _bridge_module().encode_target
    decoded = {name: _decode_target(json.loads(json.dumps(encode(t)))) for name, t in ENTRIES.items()}
    assert decoded == {
        "whole": "diffusion_model.a.weight",
        "slice": ("diffusion_model.qkv.weight", (0, 64, 32)),
        "converted": ("diffusion_model.final_layer.adaLN_modulation.1.weight", None, "swap_scale_shift"),
    }


def test_a_converted_entry_is_reported_per_layer_not_guessed() -> None:
    keys = [
        "diffusion_model.a.weight",
        "diffusion_model.qkv.weight",
        "diffusion_model.final_layer.adaLN_modulation.1.weight",
    ]
    for key_map in (ENTRIES, {n: _decode_target(json.loads(json.dumps(_bridge_module().encode_target(t))))
                              for n, t in ENTRIES.items()}):  # fmt: skip
        resolved, unresolved = resolve_layers(list(ENTRIES), keys, key_map)
        assert resolved == {"whole": "diffusion_model.a.weight", "slice": "diffusion_model.qkv.weight[0:64:32]"}
        assert set(unresolved) == {"converted"}
        assert unresolved["converted"] == (
            "ComfyUI converts this layer's update (swap_scale_shift) before adding it to "
            "diffusion_model.final_layer.adaLN_modulation.1.weight, so its factors do not lie in the weight's row "
            "order; converted layers are not transferred"
        )
