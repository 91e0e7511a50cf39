"""Slices of fused weights (issue 13): the canonical key, the resolver, the file reader, the transfer.

A fused ``qkv`` weight (3h, h) is built with decaying spectra per slice; a diffusers-style LoRA
patches its ``to_q``/``to_k``/``to_v`` rows through a ComfyUI-style key map entry
``(model key, (0, offset, h))``. Each slice must be transferred in its *own* subspaces and
come back under its own key.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorax_core.errors import FormatError
from lorax_core.formats import LoraFile
from lorax_core.formats.resolve import resolve_layers
from lorax_core.linalg import top_subspace
from lorax_core.modelio import SafetensorsWeights
from lorax_core.pipeline import plan_transfer
from lorax_core.slices import WeightSlice, parse_slice_key, slice_from_comfy
from lorax_core.transfer import transfer_adapter, transfer_lora_layer
from lorax_core.types import LoraFactors, TransferOptions

H = 48
QKV = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
PROJ = "diffusion_model.double_blocks.0.img_attn.proj.weight"
NAMES = {part: f"transformer.transformer_blocks.0.attn.to_{part}" for part in "qkv"}
KEY_MAP = {NAMES[p]: (QKV, (0, i * H, H)) for i, p in enumerate("qkv")} | {
    "transformer.transformer_blocks.0.attn.to_out.0": PROJ
}


def _weights(make_weight, make_orthogonal) -> dict[str, torch.Tensor]:
    # Three slices with unrelated spectra: the fused weight's own subspace is not any slice's.
    return {QKV: torch.cat([make_weight(H, H) for _ in range(3)]), PROJ: make_weight(H, H)}


def _save(path: Path, weights: dict[str, torch.Tensor]) -> SafetensorsWeights:
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    return SafetensorsWeights(path)


def _lora(make_factors) -> LoraFile:
    layers = {name: make_factors(H, H, 4) for name in NAMES.values()}
    layers["transformer.transformer_blocks.0.attn.to_out.0"] = make_factors(H, H, 4)
    return LoraFile(format="peft", layers=layers)


def _dense(f: LoraFactors) -> torch.Tensor:
    return f.up2d().float() @ f.down2d().float() * f.scale


def test_canonical_key_round_trips_and_ordinary_keys_are_not_slices():
    piece = WeightSlice(QKV, 0, 96, 48)
    assert piece.key == f"{QKV}[0:96:48]"
    assert parse_slice_key(piece.key) == piece
    assert parse_slice_key(QKV) is None
    assert parse_slice_key(f"{QKV}[0:0:0]") is None  # an empty slice is no layer


def test_slice_shape_fit_and_take_copies():
    piece = WeightSlice("w", 0, 2, 3)
    base = torch.arange(12.0).reshape(6, 2)
    assert piece.fits((6, 2)) and not piece.fits((4, 2)) and not WeightSlice("w", 2, 0, 1).fits((6, 2))
    assert piece.shape((6, 2)) == (3, 2)
    part = piece.take(base)
    assert torch.equal(part, base[2:5])
    part += 1
    assert torch.equal(base, torch.arange(12.0).reshape(6, 2))  # never a view of the base weight


@pytest.mark.parametrize("spec", [(0, 0), (0, -1, 4), (0, 0, 0), (0, True, 4), "0:0:4", (0, 0, 4.0)])
def test_slice_from_comfy_refuses_what_it_cannot_read(spec):
    assert slice_from_comfy(QKV, spec) is None


def test_resolver_gives_each_slice_its_own_key_and_explains_misses():
    keys = [QKV, PROJ]
    key_map = dict(KEY_MAP) | {"odd": (QKV, (0, 1)), "gone": ("diffusion_model.nowhere.weight", (0, 0, H))}
    resolved, unresolved = resolve_layers([*NAMES.values(), "odd", "gone"], keys, key_map)
    assert resolved == {NAMES[p]: f"{QKV}[0:{i * H}:{H}]" for i, p in enumerate("qkv")}
    assert unresolved["odd"] == f"ComfyUI maps it to part (0, 1) of {QKV}, a slice description this version cannot read"
    assert unresolved["gone"] == (
        "ComfyUI maps it to a slice of diffusion_model.nowhere.weight, which the source model does not have"
    )


def test_file_reader_serves_row_slices_and_lists_them_once_used(tmp_path, make_weight, make_orthogonal):
    weights = _weights(make_weight, make_orthogonal)
    source = _save(tmp_path / "m.safetensors", weights)
    k_key = f"{QKV}[0:{H}:{H}]"
    assert k_key not in set(source.keys())
    assert source.shape(k_key) == (H, H)
    torch.testing.assert_close(source.get(k_key), weights[QKV][H : 2 * H], rtol=0, atol=0)
    assert k_key in set(source.keys())  # the transfer looks its source keys up in keys()
    assert f"{QKV}[0:{2 * H}:{2 * H}]" not in source  # rows beyond the weight
    with pytest.raises(FormatError, match=r"no weight '.*\[1:0:4\]' in this model"):
        source.get(f"{QKV}[1:0:4]")  # only output rows are sliced


def test_slices_transfer_in_their_own_subspaces_and_round_trip(tmp_path, make_weight, make_orthogonal, make_factors):
    weights = _weights(make_weight, make_orthogonal)
    source = _save(tmp_path / "src.safetensors", weights)
    lora = _lora(make_factors)
    plan = plan_transfer(lora, source, KEY_MAP)
    assert not plan.skipped and len(plan.layers) == 4

    # target = source: ΔW comes back (issue 13: identity error ≤ 1e-3).
    same_file = _save(tmp_path / "same.safetensors", weights)
    same_file.add_slices(plan.layers)  # what the command line does with its target file
    same = transfer_adapter(plan.layers, source, same_file, TransferOptions(method="exact", rank=16), names=plan.names)
    assert len(same.report.transferred) == 4
    for key, layer in plan.layers.items():
        want = _dense(layer)
        assert float((_dense(same.layers[key]) - want).norm() / want.norm()) <= 1e-3

    # target ≠ source: each slice moves with the subspaces of *its* rows, not of the fused weight.
    moved = {k: v + 0.05 * v.norm() * torch.randn_like(v) / v.numel() ** 0.5 for k, v in weights.items()}
    target = _save(tmp_path / "tgt.safetensors", moved)
    target.add_slices([*plan.layers, f"{QKV}[0:{3 * H}:1]", PROJ])  # slices beyond the rows and plain keys: ignored
    assert f"{QKV}[0:{3 * H}:1]" not in set(target.keys())
    result = transfer_adapter(
        plan.layers, source, target, TransferOptions(method="exact", rank=16, force=True), names=plan.names
    )
    for i, part in enumerate("qkv"):
        key = f"{QKV}[0:{i * H}:{H}]"
        rows = slice(i * H, (i + 1) * H)
        expected = transfer_lora_layer(
            plan.layers[key], top_subspace(weights[QKV][rows], 16), top_subspace(moved[QKV][rows], 16), "exact"
        )
        torch.testing.assert_close(_dense(result.layers[key]), _dense(expected), rtol=1e-4, atol=1e-6)
        assert next(r for r in result.report.transferred if r.source_key == key).key == NAMES[part]


def test_cache_keys_tell_slices_apart(tmp_path, make_weight, make_orthogonal, make_factors):
    class Recording:
        def __init__(self) -> None:
            self.keys: list[str] = []

        def get_or_compute(self, fingerprint, key, rank, compute):
            self.keys.append(key)
            return compute()

    weights = _weights(make_weight, make_orthogonal)
    source = _save(tmp_path / "src.safetensors", weights)
    plan = plan_transfer(_lora(make_factors), source, KEY_MAP)
    cache = Recording()
    transfer_adapter(plan.layers, source, source, TransferOptions(method="exact", rank=16), cache=cache)
    assert {f"{QKV}[0:{i * H}:{H}]" for i in range(3)} <= set(cache.keys)
    assert QKV not in cache.keys  # the fused weight itself is never decomposed
