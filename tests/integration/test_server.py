"""The pack inside a real headless ComfyUI v0.3.75: import smoke, example workflows over HTTP, errors."""

from __future__ import annotations

import json
import posixpath
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from safetensors import safe_open

from scripts.workflow_api import (
    HeadlessComfy,
    WorkflowError,
    execution_error,
    load_workflow,
    set_inputs,
    ui_to_api,
    validate_api,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
NODE_IDS = ["LoraXLoadSourceModel", "LoraXSubspaceSimilarity", "LoraXTransferLoRA",
            "LoraXApplyTransferredLoRA", "LoraXSaveTransferredLoRA", "LoraXRefineTransferredLoRA",
            "LoraXTrainLoRAX", "LoraXSaveLoRAX", "LoraXCompareTransfer"]


def _api(name: str, object_info: dict) -> tuple[dict, dict]:
    workflow = load_workflow(REPO / "example_workflows" / name)
    return ui_to_api(workflow, object_info), workflow


def _node(api: dict, class_type: str) -> str:
    return next(i for i, n in api.items() if n["class_type"] == class_type)


def _text(entry: dict, node_id: str) -> str:
    return "\n".join(entry["outputs"][node_id]["text"])


def test_quick_test_for_ci_imports_the_pack(comfy_root, tmp_path):
    smoke = HeadlessComfy(comfy_root, tmp_path, tmp_path / "models", python=sys.executable)
    done = subprocess.run(smoke.command("--quick-test-for-ci"), cwd=comfy_root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ours = [line for line in (done.stdout + done.stderr).splitlines() if "custom_nodes/comfyui_lorax" in line]
    assert ours and not any("IMPORT FAILED" in line for line in ours), ours


def test_nodes_are_registered_with_their_schema(object_info):
    for node_id in NODE_IDS:
        info = object_info[node_id]
        assert info["category"] == "LoRA-X"
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert object_info["LoraXSaveTransferredLoRA"]["output_node"] is True
    assert object_info["LoraXTransferLoRA"]["output"] == ["LORA_MODEL", "STRING"]


def test_web_extension_is_served_and_its_imports_resolve(server):
    listed = server.get("/extensions")
    ours = [p for p in listed if p.endswith("/lorax.js")]
    assert ours, listed
    script = (REPO / "web" / "js" / "lorax.js").read_text()
    base = ours[0].rsplit("/", 1)[0]
    for target in re.findall(r'from "([^"]+)"', script):
        resolved = posixpath.normpath(posixpath.join(base, target))
        with urllib.request.urlopen(server.url + resolved, timeout=30) as r:
            assert r.status == 200, resolved


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflows_fit_object_info(path, object_info):
    workflow = load_workflow(path)
    assert workflow["nodes"] and "links" in workflow  # UI (drag-and-drop) format
    problems = validate_api(ui_to_api(workflow, object_info), object_info)
    assert problems == []


def test_transfer_apply_sample_runs_to_an_image(server, object_info):
    api, workflow = _api("transfer_apply_sample.json", object_info)
    set_inputs(api, "EmptyLatentImage", width=64, height=64)
    set_inputs(api, "KSampler", steps=2)
    entry = server.run(api, workflow)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    report = _text(entry, _node(api, "LoraXTransferLoRA"))
    assert "60 of 60 layers transferred" in report
    images = entry["outputs"][_node(api, "SaveImage")]["images"]
    assert images and (server.output / images[0]["subfolder"] / images[0]["filename"]).is_file()
    applied = _text(entry, _node(api, "LoraXApplyTransferredLoRA"))
    assert applied.startswith("applied 48 model and 12 text-encoder weights")


def test_similarity_report_previews_chart_and_text(server, object_info):
    api, workflow = _api("similarity_report.json", object_info)
    entry = server.run(api, workflow)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    sim = _node(api, "LoraXSubspaceSimilarity")
    assert _text(entry, sim).startswith("subspace similarity: ")
    assert entry["outputs"][_node(api, "PreviewImage")]["images"]


def test_transfer_save_writes_a_file_the_stock_loader_loads(server, object_info):
    api, workflow = _api("transfer_save.json", object_info)
    entry = server.run(api, workflow)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    saved = _text(entry, _node(api, "LoraXSaveTransferredLoRA"))
    name = saved.split()[1]
    path = server.loras / name
    assert path.is_file() and path.with_suffix(".report.json").is_file()
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["lorax.source_lora"] == "lorax_tiny_sd15_lora.safetensors"
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in f.keys())
    assert "60 of 60 layers transferred" in _text(entry, _node(api, "PreviewAny"))
    report = json.loads(path.with_suffix(".report.json").read_text())
    assert report["totals"]["transferred"] == 60

    # The stock LoraLoader lists and loads it (its output feeds a text preview so it runs).
    listed = server.object_info()["LoraLoader"]["input"]["required"]["lora_name"][0]
    assert name in listed
    follow_up = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "lorax_tiny_sd15_target.safetensors"}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": name,
                                                      "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a lighthouse"}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
    }
    done = server.run(follow_up)
    assert done["status"]["status_str"] == "success", execution_error(done)
    assert "lora key not loaded" not in server.log_tail(20000)


def test_transfer_refine_refines_applies_samples_and_saves(server, object_info):
    # Small budgets: 64 px generations (8×8 latents), 4 refine steps on 16 probes, 2 sampling steps.
    api, workflow = _api("transfer_refine.json", object_info)
    set_inputs(api, "EmptyLatentImage", width=64, height=64)
    set_inputs(api, "KSampler", steps=2)
    set_inputs(api, "LoraXRefineTransferredLoRA", steps=4, probes=16, sample_steps=2, batch=4)
    entry = server.run(api, workflow, timeout=900)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    report = _text(entry, _node(api, "LoraXRefineTransferredLoRA"))
    assert report.startswith("lorax_tiny_sd15_lora.safetensors: SD15 → SD15\nLoRA-X transfer: 60 of 60 layers")
    assert "Refined (effect matching): 4 steps, lr 0.003, batch 4, 16 synthetic probes, keep_guidance 0.5" in report
    assert "48 diffusion-model layers refined" in report
    assert entry["outputs"][_node(api, "PreviewImage")]["images"]  # the loss curve
    images = entry["outputs"][_node(api, "SaveImage")]["images"]
    assert images and (server.output / images[0]["subfolder"] / images[0]["filename"]).is_file()
    assert _text(entry, _node(api, "LoraXApplyTransferredLoRA")).startswith("applied 48 model and 12 text-encoder")
    name = _text(entry, _node(api, "LoraXSaveTransferredLoRA")).split()[1]
    with safe_open(str(server.loras / name), framework="pt") as f:
        meta = f.metadata()
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in f.keys())
    assert meta["lorax.refined"] == "true" and meta["lorax.refine.steps"] == "4"
    assert meta["lorax.source_lora"] == "lorax_tiny_sd15_lora.safetensors"


def test_foreign_lora_ends_in_execution_error_with_our_message(server, object_info):
    api, workflow = _api("transfer_save.json", object_info)
    set_inputs(api, "LoraXTransferLoRA", lora_name="lorax_tiny_foreign_lora.safetensors")
    entry = server.run(api, workflow)
    error = execution_error(entry)
    assert entry["status"]["status_str"] == "error" and error is not None
    assert error["node_type"] == "LoraXTransferLoRA"
    assert error["exception_message"].startswith("Transfer LoRA: ")
    assert "no layer fits lorax_tiny_sd15_source.safetensors (4 shape mismatches" in error["exception_message"]


def test_bad_file_name_is_refused_at_validation(server, object_info):
    api, _ = _api("transfer_save.json", object_info)
    set_inputs(api, "LoraXSaveTransferredLoRA", file_name="../outside")
    with pytest.raises(WorkflowError, match=re.escape("Save Transferred LoRA: file_name '../outside' must be a plain")):
        server.queue(api)
