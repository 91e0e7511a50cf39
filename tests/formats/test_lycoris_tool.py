"""LyCORIS adapters made by the real ``lycoris-lora`` transfer, round-trip, and load in stock ComfyUI.

Files: tests/formats/_lycoris_helpers.py (LoHa, Tucker LoHa, LoKr factored/full/Tucker, Tucker LoCon,
DoRA on a LoCon and on a LoHa, full ``.diff``) on five layers of the tiny SD1.5 checkpoint
(linear square/wide/tall, 1×1 and 3×3 conv). Every transfer runs the CLI in-process with
``--comfyui`` (the real ComfyUI at ``LORAX_COMFYUI``); every ΔW is measured *as ComfyUI applies it*:
``comfy.lora.load_lora`` + ``comfy.lora.calculate_weight`` on the base weight.

Checked per type: (i) target = source returns the input's patched weights within 1e-3 relative,
(ii) ComfyUI's loader leaves 0 keys of the output unloaded, (iii) on the fine-tuned target the
output equals an independent dense computation of the method (projectors from ``torch.linalg.svd``)
within the truncation error the report states, and DoRA's patched weight is the re-derived one.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _lycoris_helpers import KINDS, LAYERS, make_lycoris_file
from safetensors import safe_open
from safetensors.torch import load_file

from lorax_core.cli import _comfyui_key_map, main

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
COMFYUI = Path(os.environ.get("LORAX_COMFYUI", ROOT / ".comfyui")).resolve()
RANK = 16


@pytest.fixture(scope="module")
def tiny() -> Any:
    from scripts.make_tiny_models import make_tiny_models

    return make_tiny_models()


@pytest.fixture(scope="module")
def key_map(tiny: Any) -> dict[str, Any]:
    if not (COMFYUI / "comfy" / "lora.py").is_file():
        pytest.fail(f"ComfyUI not found at {COMFYUI}: run `bash scripts/setup.sh` or set LORAX_COMFYUI.")
    if str(COMFYUI) not in sys.path:
        sys.path.insert(0, str(COMFYUI))
    import comfy.cli_args  # noqa: TID251 -- the test drives the real host

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported (CUDA torch, no GPU)
    return _comfyui_key_map(COMFYUI, tiny.source_checkpoint)[0]


@pytest.fixture(scope="module")
def files(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("lycoris")
    return {kind: make_lycoris_file(kind, tiny.source_checkpoint, folder / f"{kind}.safetensors") for kind in KINDS}


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(checkpoint), "pt") as f:
        return {
            k.removeprefix("model."): f.get_tensor(k).to(torch.float64)
            for k in f.keys()
            if k.startswith("model.diffusion_model.") and any(f".{p}." in k for p in LAYERS)
        }


class _NotLoaded(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("lora key not loaded"):
            self.keys.append(message)


def comfy_patched(
    path: Path, key_map: dict[str, Any], weights: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``({model key: patched weight}, keys ComfyUI did not load)`` as stock ``LoraLoader`` applies the file."""
    import comfy.lora  # noqa: TID251 -- the test drives the real host
    import comfy.lora_convert  # noqa: TID251

    handler = _NotLoaded()
    logging.getLogger().addHandler(handler)
    try:
        patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(load_file(str(path))), key_map, log_missing=True)
    finally:
        logging.getLogger().removeHandler(handler)
    out = {}
    for key, patch in patches.items():
        name = key if isinstance(key, str) else key[0]
        weight = weights[name].to(torch.float32).clone()
        out[name] = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], weight, name).to(torch.float64)
    return out, handler.keys


def _transfer(source: Path, target: Path, lora: Path, out: Path) -> dict[str, Any]:
    report = out.with_suffix(".json")
    argv = ["transfer", "--source", source, "--target", target, "--lora", lora, "--out", out, "--report", report]
    argv += ["--comfyui", COMFYUI, "--rank", str(RANK), "--quiet"]
    assert main([str(a) for a in argv]) == 0
    return json.loads(report.read_text())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip_as_comfyui_applies_it(
    files: dict[str, Path], tiny: Any, key_map: dict[str, Any], tmp_path: Path, kind: str
) -> None:
    """(i) target = source: the output's patched weights equal the input's within 1e-3; (ii) 0 keys not loaded."""
    weights = _weights(tiny.source_checkpoint)
    out = tmp_path / "out.safetensors"
    report = _transfer(tiny.source_checkpoint, tiny.source_checkpoint, files[kind], out)
    assert (report["totals"]["transferred"], report["totals"]["skipped"]) == (len(LAYERS), 0)
    before, missing_in = comfy_patched(files[kind], key_map, weights)
    after, missing_out = comfy_patched(out, key_map, weights)
    assert missing_in == [] and missing_out == []
    assert set(after) == set(before) and len(before) >= len(LAYERS)
    # ComfyUI v0.3.75 fails on LyCORIS' Tucker LoKr conv layers (torch.kron of a non-contiguous einsum
    # result raises; ComfyUI logs "ERROR lokr" and leaves the weight unchanged), for the input and the
    # output alike: such a layer applies nothing on either side and is compared as the pack reads it.
    inert = [k for k in before if bool((before[k] == weights[k]).all())]
    assert inert == ([] if kind != "lokr_tucker" else ["diffusion_model.input_blocks.1.0.in_layers.2.weight"])
    errors = {k: _rel(after[k] - weights[k], before[k] - weights[k]) for k in before if k not in inert}
    assert max(errors.values()) <= 1e-3, errors
    written = sorted({str(r["written_as"]) for r in report["layers"]})
    print(
        f"\nTABLE {kind} | kohya | {'/'.join(written)} | round-trip max {max(errors.values()):.1e} | not loaded {len(missing_out)}"
    )


def _basis(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, _, Vh = torch.linalg.svd(weight.reshape(weight.shape[0], -1), full_matrices=False)
    return U[:, :rank], Vh[:rank].T


def _exact(delta: torch.Tensor, ws: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """The ``exact`` method densely: ``M ΔW M'ᵀ`` with ``M = P_t P_s + Q_t Q_s`` (top-RANK projectors)."""
    m, n = delta.shape
    (Us, Vs), (Ut, Vt) = _basis(ws, RANK), _basis(wt, RANK)
    Ps, Pt, Pps, Ppt = Us @ Us.T, Ut @ Ut.T, Vs @ Vs.T, Vt @ Vt.T
    M = Pt @ Ps + (torch.eye(m, dtype=delta.dtype) - Pt) @ (torch.eye(m, dtype=delta.dtype) - Ps)
    Mp = Ppt @ Pps + (torch.eye(n, dtype=delta.dtype) - Ppt) @ (torch.eye(n, dtype=delta.dtype) - Pps)
    return M @ delta @ Mp.T


@pytest.mark.parametrize(
    "kind", ["loha", "loha_tucker", "lokr_factored", "lokr_full", "lokr_tucker", "locon_tucker", "full", "dora"]
)
def test_transfer_matches_a_dense_reference(
    files: dict[str, Path], tiny: Any, key_map: dict[str, Any], tmp_path: Path, kind: str
) -> None:
    """(iii) On the fine-tuned target, ComfyUI's patched weight is the method's, within the reported truncation error."""
    ws, wt = _weights(tiny.source_checkpoint), _weights(tiny.target_checkpoint)
    out = tmp_path / "out.safetensors"
    report = _transfer(tiny.source_checkpoint, tiny.target_checkpoint, files[kind], out)
    assert report["totals"]["skipped"] == 0
    source_patched, _ = comfy_patched(files[kind], key_map, ws)
    target_patched, missing = comfy_patched(out, key_map, wt)
    assert missing == []
    rows = {r["target_key"]: r for r in report["layers"]}
    deviations = []
    for key, row in rows.items():
        flat = ws[key].reshape(ws[key].shape[0], -1)
        if kind == "dora":
            # ComfyUI's DoRA on the output axis: W' = m ⊙ (W + ΔW)/‖W‖_row; recover ΔW from the file.
            lora = load_file(str(files[kind]))
            name = "lora_unet_" + key.removeprefix("diffusion_model.").removesuffix(".weight").replace(".", "_")
            up, down = lora[f"{name}.lora_up.weight"].double(), lora[f"{name}.lora_down.weight"].double()
            delta = (
                (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))
                * float(lora[f"{name}.alpha"])
                / down.shape[0]
            )
            gain = lora[f"{name}.dora_scale"].double().reshape(-1, 1) / flat.norm(dim=1, keepdim=True)
        else:
            delta = (source_patched[key] - ws[key]).reshape(flat.shape)
            if not bool(delta.any()):  # ComfyUI's Tucker LoKr conv failure (see the round-trip test)
                assert (kind, key) == ("lokr_tucker", "diffusion_model.input_blocks.1.0.in_layers.2.weight")
                continue
        moved = delta if row["method"] == "copy" else _exact(delta, ws[key], wt[key])
        tflat = wt[key].reshape(flat.shape)
        got = target_patched[key].reshape(flat.shape)
        if kind == "dora":
            want = gain * (tflat + moved)
            deviations.append(_rel(got, want))
            assert deviations[-1] <= 1e-4, key
        else:
            bound = (row["truncation_error"] or 0.0) + 1e-3
            deviations.append(_rel(got - tflat, moved))
            assert deviations[-1] <= bound, (key, row["written_as"], deviations[-1], bound)
            if kind.startswith(("loha", "lokr")) and row["written_as"] == "lora":
                assert row["truncation_error"] <= 0.1 + 1e-6  # ≥ 99 % of the energy kept
    written = "/".join(sorted({str(r["written_as"]) for r in rows.values()}))
    worst = max(r["truncation_error"] or 0.0 for r in rows.values())
    print(f"\nTARGET {kind} | {written} | max truncation error {worst:.3f} | max deviation {max(deviations):.3f}")
