"""The README's screenshots of the nodes, from a real Chromium running the example workflows.

Starts a headless ComfyUI (``LORAX_COMFYUI``, default ``.comfyui``) with the tiny demo models
(scripts/make_tiny_models.py), opens its frontend in Chromium (scripts/browser.py), runs each
workflow with Queue and saves the part of the canvas that shows the node's report:

* ``transfer_report.png``: transfer_save.json, the report view on the Transfer LoRA node;
* ``similarity_view.png``: similarity_report.json, the view on Compute Subspace Similarity and its chart.

The demo models are random networks, so images they generate are noise; the comparison grid of the
README comes from the toy world instead (scripts/toy_compare_grid.py)::

    .venv/bin/python -m scripts.screenshots [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from scripts.browser import APP, chromium, close_dialogs, load_graph, open_app, queue, wait_for
from scripts.make_tiny_models import make_tiny_models
from scripts.workflow_api import HeadlessComfy

ROOT = Path(__file__).resolve().parent.parent
COMFY_ROOT = ROOT / ".comfyui"
PAD = 12
TITLE_H = 34  # the node's title bar sits above its position

# Put the graph's top-left node at (x, y) of the canvas, 1:1 (below the frontend's banner).
FRAME_JS = f"""
const app = {APP};
app.canvas.ds.scale = 1;
const nodes = app.graph._nodes;
const left = Math.min(...nodes.map((n) => n.pos[0]));
const top = Math.min(...nodes.map((n) => n.pos[1]));
app.canvas.ds.offset = [arguments[0] - left, arguments[1] - top];
app.canvas.setDirty(true, true);
"""
# The client rectangle of a set of nodes (by type), title bars included.
RECT_JS = f"""
const app = {APP};
const box = app.canvas.canvas.getBoundingClientRect();
const ds = app.canvas.ds;
const picked = app.graph._nodes.filter((n) => arguments[0].includes(n.type));
const xs = picked.flatMap((n) => [n.pos[0], n.pos[0] + n.size[0]]);
const ys = picked.flatMap((n) => [n.pos[1] - {TITLE_H}, n.pos[1] + n.size[1]]);
return [box.left + (Math.min(...xs) + ds.offset[0]) * ds.scale, box.top + (Math.min(...ys) + ds.offset[1]) * ds.scale,
        box.left + (Math.max(...xs) + ds.offset[0]) * ds.scale, box.top + (Math.max(...ys) + ds.offset[1]) * ds.scale];
"""
VIEW_DONE_JS = f"""
const node = {APP}.graph._nodes.find((n) => n.type === arguments[0]);
return !!node?.widgets?.find((w) => w.name === "lorax_report")?.loraxView?.cells?.length;
"""


def shoot(driver, url: str, workflow: Path, nodes: list[str], out: Path, wait_images: str | None = None) -> None:
    """Run ``workflow`` in the page and save the screen area of ``nodes`` to ``out`` (a small PNG)."""
    open_app(driver, url)
    load_graph(driver, json.loads(workflow.read_text(encoding="utf-8")))
    driver.execute_script(FRAME_JS, 80, 170)
    queue(driver)
    wait_for(f"the report view of {nodes[0]}", lambda: driver.execute_script(VIEW_DONE_JS, nodes[0]), timeout=1200)
    if wait_images:
        wait_for(f"{wait_images}'s image", lambda: driver.execute_script(
            f"return !!{APP}.graph._nodes.find((n) => n.type === arguments[0])?.imgs?.length;", wait_images), timeout=600)
    driver.execute_script(FRAME_JS, 80, 170)
    close_dialogs(driver)
    time.sleep(2)  # two frames: the DOM widgets follow the canvas' new offset
    left, top, right, bottom = driver.execute_script(RECT_JS, nodes)
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    ratio = shot.width / driver.execute_script("return window.innerWidth;")
    crop = shot.crop((max(0, int((left - PAD) * ratio)), max(0, int((top - PAD) * ratio)),
                      min(shot.width, int((right + PAD) * ratio)), min(shot.height, int((bottom + PAD) * ratio))))
    out.parent.mkdir(parents=True, exist_ok=True)
    crop.quantize(colors=128).save(out, optimize=True)
    print(f"wrote {out} ({crop.width}×{crop.height}, {out.stat().st_size // 1024} KiB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--comfyui", type=Path, default=None, help="the ComfyUI folder (default: LORAX_COMFYUI or .comfyui)")
    args = parser.parse_args(argv)
    comfy_root = (args.comfyui or Path(os.environ.get("LORAX_COMFYUI", COMFY_ROOT))).resolve()
    tiny = make_tiny_models()
    with tempfile.TemporaryDirectory() as work:
        # One BLAS thread: on a shared machine two threads made each small eigh take seconds (tests/nodes/conftest.py).
        server = HeadlessComfy(comfy_root, Path(work), tiny.root, python=sys.executable, threads=1).start()
        driver = chromium(1920, 1200)  # wide: the run button and its toasts stay right of the nodes
        try:
            shoot(driver, server.url, ROOT / "example_workflows" / "transfer_save.json", ["LoraXTransferLoRA"],
                  args.out / "transfer_report.png")
            shoot(driver, server.url, ROOT / "example_workflows" / "similarity_report.json",
                  ["LoraXSubspaceSimilarity", "PreviewImage"], args.out / "similarity_view.png", "PreviewImage")
        finally:
            driver.quit()
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
