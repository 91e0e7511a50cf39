"""Issue 23 over ComfyUI's HTTP API: compare_transfer.json runs headless; the report view's data is in the history."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from scripts.workflow_api import execution_error, load_workflow, set_inputs, ui_to_api

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ROWS = ["source + LoRA", "target, no LoRA", "target + LoRA loaded directly (copy)", "target + transferred"]


def _node(api: dict, class_type: str) -> str:
    return next(i for i, n in api.items() if n["class_type"] == class_type)


def test_compare_transfer_runs_to_a_saved_grid_and_the_transfer_sends_its_view(server, object_info):
    workflow = load_workflow(REPO / "example_workflows" / "compare_transfer.json")
    api = ui_to_api(workflow, object_info)
    set_inputs(api, "EmptyLatentImage", width=64, height=64)
    set_inputs(api, "LoraXCompareTransfer", steps=2)
    # The session's server caches node outputs: with the example's exact Transfer inputs, the
    # workflows of test_server.py would get this run's cached Transfer node, which leaves no text
    # in their history entry. Another threshold (every layer still passes) keeps the runs apart.
    set_inputs(api, "LoraXTransferLoRA", threshold=0.45)
    entry = server.run(api, workflow, timeout=900)
    assert entry["status"]["status_str"] == "success", execution_error(entry)

    compare = entry["outputs"][_node(api, "LoraXCompareTransfer")]["text"][0]
    assert compare.startswith("Compare LoRA Transfer: seed 42, 2 steps, cfg 7, euler/normal, LoRA strength 1")
    assert [line.split(": ", 1)[1] for line in compare.splitlines()[1:]] == ROWS
    saved = entry["outputs"][_node(api, "SaveImage")]["images"]
    assert len(saved) == 1  # one grid, not one image per row
    with Image.open(server.output / saved[0]["subfolder"] / saved[0]["filename"]) as grid:
        # 4 rows of 128 px cells (64 px images scaled up 2×: at least 96 px), 2 columns (the latent batch).
        assert grid.height == 8 + 30 + 4 * (128 + 4) - 4 + 8, grid.size  # margin, title, rows, margin
        assert grid.width >= 2 * 128 + 4

    view = entry["outputs"][_node(api, "LoraXTransferLoRA")]["lorax_view"][0]
    assert view["verdict"].startswith("60 of 60 layers transferred · mean Φ ")
    assert len(view["layers"]) == 60 and view["columns"][:4] == ["name", "section", "block", "outcome"]
    sections = {row[1] for row in view["layers"]}
    assert sections == {"text encoder", "input", "middle", "output"}, sections
