"""The web extension in a real Chromium against ComfyUI's real frontend (issue 12 item 9).

A LoRA-X node shows its report in a text box (web/js/lorax.js). The box must survive what users
do: reload the page, reopen a saved workflow, and queue again when ComfyUI serves the node from
its cache. Chromium and chromedriver come from Debian (``apt-get install chromium
chromium-driver``; .ci/run installs them); selenium is a dev dependency.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("LORAX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = os.environ.get("LORAX_CHROMEDRIVER") or shutil.which("chromedriver")
NODE = "LoraXSubspaceSimilarity"

# The ComfyUI app object (window.app in older frontends, comfyAPI.app.app in newer ones).
APP = "(window.comfyAPI?.app?.app ?? window.app)"
REPORT_JS = f"""
const app = {APP};
const node = app?.graph?._nodes?.find((n) => n.type === arguments[0]);
if (!node) return null;
const widget = node.widgets?.find((w) => w.name === "lorax_report");
return {{ box: widget ? String(widget.value ?? "") : null, saved: node.properties?.lorax_report ?? null }};
"""


def _missing_browser() -> str | None:
    if not (CHROMIUM and CHROMEDRIVER):
        return "Chromium/chromedriver not found (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements-dev.txt)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    problem = _missing_browser()
    if problem:
        if os.environ.get("LORAX_REQUIRE_BROWSER") == "1":  # set by .ci/run once it installed one
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # type: ignore[assignment]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(what: str, probe: Callable[[], Any], timeout: float = 180.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def _open(driver: Any, url: str) -> None:
    driver.get(url)
    _wait(
        "the frontend and the lorax extension",
        lambda: driver.execute_script(
            f"const app = {APP}; return !!(app?.graph && app.extensions?.some((e) => e.name === 'lorax.reportText'));"
        ),
    )


def _report(driver: Any) -> dict[str, Any] | None:
    return driver.execute_script(REPORT_JS, NODE)


def test_report_box_survives_reload_reopen_and_a_cached_run(server, browser) -> None:
    workflow = json.loads((REPO / "example_workflows" / "similarity_report.json").read_text(encoding="utf-8"))
    _open(browser, server.url)
    browser.execute_async_script(
        f"const done = arguments[arguments.length - 1]; {APP}.loadGraphData(arguments[0]).then(() => done(true));",
        workflow,
    )
    browser.execute_async_script(f"const done = arguments[arguments.length - 1]; {APP}.queuePrompt(0, 1).then(done);")
    first = _wait("the similarity report in the node's box", lambda: (_report(browser) or {}).get("box"))
    assert first.startswith("subspace similarity: "), first
    assert _report(browser)["saved"] == first  # kept in the node's properties, saved with the workflow

    # Reopen: the workflow as the user saves it (its JSON), loaded into a fresh page.
    saved = browser.execute_script(f"return {APP}.graph.serialize();")
    _open(browser, server.url)
    browser.execute_async_script(
        f"const done = arguments[arguments.length - 1]; {APP}.loadGraphData(arguments[0]).then(() => done(true));",
        saved,
    )
    assert _wait("the report after reopening", lambda: (_report(browser) or {}).get("box")) == first

    # Reload: the frontend restores the open workflow by itself.
    browser.refresh()
    _open(browser, server.url)
    assert _wait("the report after a page reload", lambda: (_report(browser) or {}).get("box")) == first

    # Queue again: ComfyUI serves the node from its cache; the box keeps (or re-shows) the report.
    browser.execute_async_script(f"const done = arguments[arguments.length - 1]; {APP}.queuePrompt(0, 1).then(done);")
    time.sleep(5)
    assert _report(browser)["box"] == first
