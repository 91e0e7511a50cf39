"""Run the example workflows on a headless ComfyUI with tiny synthetic models; keep the results.

Called by ``scripts/demo.sh`` (which builds the environment first). Steps:

1. generate the tiny SD1.5 demo models (cached under ``out/.cache``; see make_tiny_models.py);
2. start ComfyUI (``main.py --cpu`` on a free port, models via an extra_model_paths yaml);
3. run ``example_workflows/transfer_save.json``, ``transfer_apply_sample.json`` (64×64, 4 steps,
   so it finishes in seconds on a CPU) and ``similarity_report.json`` through ``/prompt`` + ``/history``;
4. copy the transferred LoRA, its report, the sampled image and the similarity chart to
   ``out/demo/`` and print where; stop the server.

The tiny models are random, so the image is noise: the demo shows the plumbing, not art.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.make_tiny_models import DEFAULT_OUT, make_tiny_models
from scripts.workflow_api import (
    HeadlessComfy,
    WorkflowError,
    execution_error,
    load_workflow,
    set_inputs,
    ui_to_api,
    validate_api,
)

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "example_workflows"


def _run(comfy: HeadlessComfy, name: str, tune: bool = False) -> tuple[dict, dict]:
    workflow = load_workflow(WORKFLOWS / name)
    info = comfy.object_info()
    api = ui_to_api(workflow, info)
    problems = validate_api(api, info)
    if problems:
        raise WorkflowError(f"{name} does not fit this ComfyUI: " + "; ".join(problems))
    if tune:
        set_inputs(api, "EmptyLatentImage", width=64, height=64)
        set_inputs(api, "KSampler", steps=4)
    print(f"running {name} …", flush=True)
    entry = comfy.run(api, workflow, timeout=900)
    if entry["status"].get("status_str") != "success":
        error = execution_error(entry) or {}
        raise WorkflowError(f"{name} failed in {error.get('node_type')}: {error.get('exception_message')}")
    return api, entry


def _node(api: dict, class_type: str) -> str:
    return next(i for i, n in api.items() if n["class_type"] == class_type)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo", help="result folder (default out/demo)")
    args = parser.parse_args(argv)
    comfy_root = Path(os.environ.get("LORAX_COMFYUI", ROOT / ".comfyui")).resolve()
    if not (comfy_root / "main.py").is_file():
        print(f"ComfyUI not found at {comfy_root}; run `bash scripts/setup.sh` first.", file=sys.stderr)
        return 2
    out = args.out.resolve()
    work = out / ".server"
    shutil.rmtree(work, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    print(f"generating tiny demo models in {DEFAULT_OUT} …", flush=True)
    models = make_tiny_models()
    # One OpenMP thread: the tiny models need no more, and on a busy 2-core machine two threads
    # made the first transfer take minutes instead of seconds (measured: 207 s vs 4 s).
    comfy = HeadlessComfy(comfy_root, work, models.root, threads=1)
    print(f"starting ComfyUI headless on {comfy.url} (log: {comfy.log_path}) …", flush=True)
    comfy.start()
    try:
        api, entry = _run(comfy, "transfer_save.json")
        saved = comfy.loras / entry["outputs"][_node(api, "LoraXSaveTransferredLoRA")]["text"][0].split()[1]
        shutil.copyfile(saved, out / "transferred_lora.safetensors")
        shutil.copyfile(saved.with_suffix(".report.json"), out / "transfer_report.json")
        report = "\n".join(entry["outputs"][_node(api, "LoraXTransferLoRA")]["text"])
        (out / "transfer_report.txt").write_text(report + "\n")

        api, entry = _run(comfy, "transfer_apply_sample.json", tune=True)
        image = entry["outputs"][_node(api, "SaveImage")]["images"][0]
        (out / "sample.png").write_bytes(comfy.view(image))

        api, entry = _run(comfy, "similarity_report.json")
        chart = entry["outputs"][_node(api, "PreviewImage")]["images"][0]
        (out / "similarity_chart.png").write_bytes(comfy.view(chart))
        summary = "\n".join(entry["outputs"][_node(api, "LoraXSubspaceSimilarity")]["text"])
        (out / "similarity_summary.txt").write_text(summary + "\n")
    except WorkflowError as exc:
        print(f"demo failed: {exc}\nserver log: {comfy.log_path}", file=sys.stderr)
        return 1
    finally:
        comfy.stop()
    print("\n" + report)
    print(f"\nresults in {out}:")
    for path in sorted(out.iterdir()):
        if path.is_file():
            print(f"  {path.name}")
    print(
        "\nThe demo models are tiny random networks (no real weights can be downloaded here), so the\n"
        "generated image is noise: it shows that the workflow runs end to end, not image quality."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
