"""example_workflows/migrate_library.json in a real headless ComfyUI: a folder with good and bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from scripts.workflow_api import execution_error, load_workflow, ui_to_api

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_migrate_library_workflow_writes_the_folder_and_shows_the_summary(server, object_info, tiny_models):
    assert object_info["LoraXMigrateLoRAFolder"]["output_node"] is True
    # The workflow migrates "(all loras)": the server's first loras folder, where this library goes.
    library = server.loras / "library"
    (library / "styles").mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_models.lora, library / "styles" / "sd15_style.safetensors")
    shutil.copy(tiny_models.foreign_lora, library / "foreign.safetensors")
    (library / "old.ckpt").write_bytes(b"a pickle, never loaded")
    workflow = load_workflow(REPO / "example_workflows" / "migrate_library.json")
    api = ui_to_api(workflow, object_info)
    entry = server.run(api, workflow)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    node = next(i for i, n in api.items() if n["class_type"] == "LoraXMigrateLoRAFolder")
    shown = "\n".join(entry["outputs"][node]["text"])
    assert shown.startswith("# LoRA folder migration") and "Written to lorax/my_target/" in shown
    out = server.loras / "lorax" / "my_target"
    rows = {r["file"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    transferred = rows["library/styles/sd15_style.safetensors"]
    assert (transferred["outcome"], transferred["layers"], transferred["transferred"]) == ("transferred", 60, 60)
    assert (out / "library" / "styles" / "sd15_style.safetensors").is_file()
    assert rows["library/old.ckpt"]["reason"] == "pickle"
    assert rows["library/foreign.safetensors"]["outcome"] == "failed"
    assert not any(name.startswith("lorax/") for name in rows)  # the pack's own outputs are not inputs
    # Problems first in the table shown on the node.
    assert shown.index("old.ckpt") < shown.index("sd15_style.safetensors")
