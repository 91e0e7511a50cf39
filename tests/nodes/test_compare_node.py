"""Compare LoRA Transfer on the tiny SD1.5 models inside a real, in-process ComfyUI v0.3.75.

The grid must hold one labelled row per variant (the refined row only when connected), every row
sampled with the same noise and settings through ComfyUI's sampler, and the node must run on the
models already loaded: patched clones, never a second model (checked through
``comfy.model_management``, which every sampling run goes through to load its model).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import comfy.model_management
import comfy.sample
import pytest
import torch
from comfy_harness import pack_module

pytestmark = pytest.mark.comfy

SETTINGS = {"seed": 5, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "strength": 1.0}
LABELS = ["source + LoRA", "target, no LoRA", "target + LoRA loaded directly (copy)", "target + transferred"]


def _conditioning(seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 768, generator=g), {}]]


@pytest.fixture(scope="module")
def setup(tiny, folders, unet_models, target_checkpoint) -> dict:
    """The tiny models, the transferred LoRA and the shared inputs, as a workflow would connect them."""
    load = pack_module("nodes.load").LoraXLoadSourceModel
    transfer = pack_module("nodes.transfer").LoraXTransferLoRA
    source_model, target_model = unet_models
    with torch.inference_mode():
        source = load.execute(tiny.source_unet.name).result[0]
        transferred = transfer.execute(source=source, target=target_model, lora_name=tiny.lora.name, method="auto",
                                       rank=320, threshold=0.5).result[0]
    return {"source_model": source_model, "target_model": target_model, "transferred": transferred,
            "positive": _conditioning(1), "negative": _conditioning(2),
            "latent": {"samples": torch.zeros(2, 4, 8, 8)}, "vae": target_checkpoint[2], "lora_name": tiny.lora.name}


@pytest.fixture
def loads(monkeypatch) -> Iterator[list]:
    """Every ModelPatcher handed to ComfyUI's model loader while the test runs."""
    seen: list = []
    original = comfy.model_management.load_models_gpu

    def recording(models, *args, **kwargs):
        seen.extend(models)
        return original(models, *args, **kwargs)

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", recording)
    yield seen


def _loaded() -> set[int]:
    """The modules ComfyUI's model management holds loaded (by identity)."""
    return {id(lm.model.model) for lm in comfy.model_management.current_loaded_models if lm.model is not None}


def _compare(setup: dict, **extra):
    node = pack_module("nodes.compare").LoraXCompareTransfer
    with torch.inference_mode():
        return node.execute(**setup, **SETTINGS, **extra)


def _layout(rows: int, image: int = 64) -> tuple[int, int, int]:
    """(grid height, top of the first row, row pitch) by nodes/_grid.py's layout for 2 columns."""
    grid = pack_module("nodes._grid")
    cell = image * max(1, -(-96 // image))
    top = grid.MARGIN + grid.TITLE_H
    return top + rows * (cell + grid.GAP) - grid.GAP + grid.MARGIN, top, cell + grid.GAP


def _tile(grid: torch.Tensor, row: int, column: int, rows: int) -> torch.Tensor:
    """The (downscaled) image at (row, column) of the grid: every ``scale``-th pixel of its cell."""
    g = pack_module("nodes._grid")
    _, top, pitch = _layout(rows)
    cell = pitch - g.GAP
    x0 = grid.shape[2] - g.MARGIN - (2 - column) * (cell + g.GAP) + g.GAP
    scale = cell // 64
    return grid[0, top + row * pitch: top + row * pitch + cell: scale, x0: x0 + cell: scale]


def test_grid_has_one_labelled_row_per_variant_sampled_like_ksampler(setup, loads) -> None:
    out = _compare(setup)
    grid = out.result[0]
    text = out.ui["text"][0]
    rows = [line.split(": ", 1)[1] for line in text.splitlines()[1:]]
    assert rows == LABELS  # no refined row when none is connected
    assert grid.dtype == torch.float32 and grid.ndim == 4 and grid.shape[-1] == 3
    assert grid.shape[1] == _layout(len(LABELS))[0]
    assert 0.0 <= float(grid.min()) and float(grid.max()) <= 1.0
    # Row 2 is exactly what KSampler + VAE Decode give for the bare target with the same settings.
    with torch.inference_mode():
        samples = setup["latent"]["samples"]
        noise = comfy.sample.prepare_noise(samples, SETTINGS["seed"])
        latent = comfy.sample.sample(setup["target_model"], noise, SETTINGS["steps"], SETTINGS["cfg"], "euler",
                                     "simple", setup["positive"], setup["negative"], samples, seed=SETTINGS["seed"])
        plain = setup["vae"].decode(latent).float()
    for column in range(2):
        expected = (plain[column].clamp(0, 1) * 255).round() / 255
        assert torch.allclose(_tile(grid, 1, column, len(LABELS)), expected, atol=1 / 255 + 1e-6)
    # The LoRA rows differ from the bare target (the LoRA does something) and from each other.
    bare = _tile(grid, 1, 0, len(LABELS))
    for row in (0, 2, 3):
        assert not torch.equal(_tile(grid, row, 0, len(LABELS)), bare), LABELS[row]


def test_rows_reuse_the_loaded_models_and_leave_them_unpatched(setup, loads) -> None:
    target, source = setup["target_model"], setup["source_model"]
    before = (dict(target.patches), dict(source.patches))
    loaded_before = _loaded()
    out = _compare(setup, refined=setup["transferred"])
    assert [line.split(": ", 1)[1] for line in out.ui["text"][0].splitlines()[1:]] == [*LABELS, "target + refined"]
    assert out.result[0].shape[1] == _layout(len(LABELS) + 1)[0]
    diffusion = [m for m in loads if m.model is not setup["vae"].patcher.model]
    assert len(diffusion) >= 5  # one sampling run per row
    # Every row ran on the source's or the target's own module: clones that share it, no copy.
    assert {id(m.model) for m in diffusion} == {id(source.model), id(target.model)}
    assert all(m is target or m.is_clone(target) for m in diffusion if m.model is target.model)
    # What model management holds now, beyond what was loaded before: only these modules, never a copy.
    assert _loaded() - loaded_before <= {id(source.model), id(target.model), id(setup["vae"].patcher.model)}
    assert (dict(target.patches), dict(source.patches)) == before  # the inputs are not modified


def test_models_of_two_families_are_refused_with_a_clear_message(setup, vega_models) -> None:
    errors = pack_module("lorax_core.errors")
    with pytest.raises(errors.IncompatibleBaseError, match=r"Compare LoRA Transfer: .*different latent spaces"):
        _compare({**setup, "target_model": vega_models[1]})


def test_docs_quote_every_tooltip() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "NODES.md").read_text()
    schema = pack_module("nodes.compare").LoraXCompareTransfer.GET_SCHEMA()
    for item in [*schema.inputs, *(schema.outputs or [])]:
        assert item.tooltip in docs, f"docs/NODES.md lacks the tooltip of LoraXCompareTransfer.{item.id}"
