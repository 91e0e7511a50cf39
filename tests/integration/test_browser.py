"""The web extension in a real Chromium against ComfyUI's real frontend (issues 12 and 23).

Transfer LoRA and Compute Subspace Similarity show a report view (web/js/lorax.js): a verdict, the
skipped layers first, a per-block heatmap with each layer's numbers on hover, and the full text. It
must survive what users do (reload the page, reopen a saved workflow, queue again when ComfyUI
serves the node from its cache) and stay quick for a 700-layer SDXL report. Chromium and
chromedriver come from Debian (``apt-get install chromium chromium-driver``; .ci/run installs
them); selenium is a dev dependency.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.browser import APP, chromium, load_graph, missing_browser, open_app, queue, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NODE = "LoraXSubspaceSimilarity"
COLUMNS = ["name", "section", "block", "outcome", "phi", "phi_left", "phi_right", "chance", "threshold",
           "energy_kept", "output_rank", "reason", "model_key"]  # nodes/_ui.py VIEW_COLUMNS

REPORT_JS = f"""
const app = {APP};
const node = app?.graph?._nodes?.find((n) => n.type === arguments[0]);
if (!node) return null;
const widget = node.widgets?.find((w) => w.name === "lorax_report");
const view = widget?.loraxView;
return {{
  box: widget ? String(widget.value ?? "") : null,
  saved: node.properties?.lorax_report ?? null,
  verdict: view ? view.verdict.textContent : null,
  cells: view ? view.cells.length : null,
  skipped: view ? [...view.skipped.children].map((c) => c.textContent) : null,
}};
"""

# Put a node on the canvas at the top left and show a synthetic report on it, as a run would.
SHOW_JS = f"""
const app = {APP};
app.graph.clear();
const node = LiteGraph.createNode("LoraXTransferLoRA");
node.pos = [90, 140];
app.graph.add(node);
app.canvas.ds.offset = [0, 0];
app.canvas.ds.scale = 1;
const started = performance.now();
node.onExecuted({{ text: [arguments[1]], lorax_view: [arguments[0]] }});
const took = performance.now() - started;
app.canvas.setDirty(true, true);
return took;
"""

# Move the mouse over a cell (by its index among the drawn cells) and return the tooltip's text.
HOVER_JS = f"""
const node = {APP}.graph._nodes.find((n) => n.type === arguments[0]);
const view = node.widgets.find((w) => w.name === "lorax_report").loraxView;
const cell = view.cells[arguments[1]];
const box = view.canvas.getBoundingClientRect();
const scale = box.width / view.canvas.offsetWidth;
const event = new MouseEvent("mousemove", {{
  bubbles: true,
  clientX: box.left + (cell.x + cell.size / 2) * scale,
  clientY: box.top + (cell.y + cell.size / 2) * scale,
}});
view.canvas.dispatchEvent(event);
return {{ tip: view.tip.style.display === "block" ? view.tip.textContent : null, name: cell.row.name,
         visible: box.width > 0 && box.height > 0 }};
"""


def synthetic_view(layers: int, skipped: int) -> dict[str, Any]:
    """A report view in the wire format of nodes/_ui.py ``transfer_view``: ``layers`` rows over
    SDXL-like blocks (text encoders, input/middle/output), the first ``skipped`` skipped for width."""
    rows: list[list[Any]] = []
    places = [("text encoder", b) for b in range(12)] + [("text encoder 2", b) for b in range(32)] + \
        [("input", b) for b in (4, 5, 7, 8)] + [("middle", -1)] + [("output", b) for b in range(6)]
    for i in range(layers):
        section, block = places[i % len(places)]
        name = f"lora_{section.replace(' ', '_')}_{block}_layer_{i}"
        if i < skipped:
            rows.append([name, section, block, "skip:width", None, None, None, None, None, None, None,
                         "width mismatch between source and target layer", None])
        else:
            phi = round(0.80 + 0.19 * ((i * 37) % 100) / 100, 4)
            rows.append([name, section, block, "exact", phi, phi, round(phi + 0.005, 4), 0.25, 0.625, 0.999, 8,
                         "", f"diffusion_model.{name}.weight"])
    rows.sort(key=lambda row: row[3] != "skip:width")
    verdict = f"{layers - skipped} of {layers} layers transferred · {skipped} skipped: width mismatch · mean Φ 0.90"
    return {"v": 1, "kind": "transfer", "title": "synthetic.safetensors: SDXL → SDXL", "verdict": verdict,
            "columns": COLUMNS, "labels": {"skip:width": "width mismatch"}, "layers": rows}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    problem = missing_browser()
    if problem:
        if os.environ.get("LORAX_REQUIRE_BROWSER") == "1":  # set by .ci/run once it installed one
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    driver = chromium()
    try:
        yield driver
    finally:
        driver.quit()


def _report(driver: Any, node: str = NODE) -> dict[str, Any] | None:
    return driver.execute_script(REPORT_JS, node)


@pytest.mark.parametrize(("layers", "skipped"), [(60, 2), (700, 9)])
def test_heatmap_renders_a_report_and_shows_a_layers_numbers_on_hover(server, browser, layers, skipped) -> None:
    view = synthetic_view(layers, skipped)
    open_app(browser, server.url)
    took_ms = browser.execute_script(SHOW_JS, view, "the full report text")
    report = wait_for("the heatmap", lambda: (_report(browser, "LoraXTransferLoRA") or {}).get("cells"))
    shown = _report(browser, "LoraXTransferLoRA")
    assert report == layers  # one cell per layer, none dropped
    assert shown["verdict"] == view["verdict"]
    assert shown["box"] == "the full report text"
    # The skipped layers are listed first, each with its reason in words.
    assert len(shown["skipped"]) == skipped and all("width mismatch" in line for line in shown["skipped"])
    for index in (0, layers - 1):
        hover = browser.execute_script(HOVER_JS, "LoraXTransferLoRA", index)
        assert hover["visible"], "the heatmap is not on screen"
        assert hover["tip"] and hover["tip"].startswith(hover["name"]), hover
        row = next(r for r in view["layers"] if r[0] == hover["name"])
        if row[4] is not None:
            assert f"Φ {row[4]:.3f}" in hover["tip"] and "rank 8" in hover["tip"]
        else:
            assert "width mismatch" in hover["tip"]
    # Not a speed limit (timings are never asserted): a record of how long drawing took here.
    print(f"{layers} layers drawn in {took_ms:.1f} ms")
    browser.save_screenshot(str(Path(os.environ.get("LORAX_SCREENSHOT_DIR", "/tmp")) / f"lorax_heatmap_{layers}.png"))


def test_report_view_survives_reload_reopen_and_a_cached_run(server, browser) -> None:
    workflow = json.loads((REPO / "example_workflows" / "similarity_report.json").read_text(encoding="utf-8"))
    open_app(browser, server.url)
    load_graph(browser, workflow)
    queue(browser)
    first = wait_for("the similarity view on the node", lambda: (_report(browser) or {}).get("cells") and _report(browser))
    assert first["box"].startswith("subspace similarity: "), first
    assert first["verdict"].startswith("60 of 60 layer pairs pass · mean Φ "), first["verdict"]
    assert first["saved"] == first["box"]  # kept in the node's properties, saved with the workflow

    # Reopen: the workflow as the user saves it (its JSON), loaded into a fresh page.
    saved = browser.execute_script(f"return {APP}.graph.serialize();")
    open_app(browser, server.url)
    load_graph(browser, saved)
    assert wait_for("the view after reopening", lambda: (_report(browser) or {}).get("cells") and _report(browser)) == first

    # Reload: the frontend restores the open workflow by itself.
    browser.refresh()
    open_app(browser, server.url)
    assert wait_for("the view after a page reload", lambda: (_report(browser) or {}).get("cells") and _report(browser)) == first

    # Queue again: ComfyUI serves the node from its cache; the view keeps (or re-shows) the report.
    queue(browser)
    time.sleep(5)
    assert _report(browser) == first
