"""Drive ComfyUI's real frontend in a headless Chromium (selenium): used by the browser tests and the screenshots.

Chromium and chromedriver come from Debian (``apt-get install chromium chromium-driver``;
``.ci/run`` installs them) or ``LORAX_CHROMIUM``/``LORAX_CHROMEDRIVER``; selenium is a dev dependency.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any

CHROMIUM = os.environ.get("LORAX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = os.environ.get("LORAX_CHROMEDRIVER") or shutil.which("chromedriver")
# The ComfyUI app object (window.app in older frontends, comfyAPI.app.app in newer ones).
APP = "(window.comfyAPI?.app?.app ?? window.app)"
EXTENSION = "lorax.reportText"


def missing_browser() -> str | None:
    """Why no browser can be started here, or ``None``."""
    if not (CHROMIUM and CHROMEDRIVER):
        return "Chromium/chromedriver not found (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements-dev.txt)"
    return None


def chromium(width: int = 1400, height: int = 900) -> Any:
    """A headless Chromium WebDriver with a ``width``×``height`` window (quit it when done)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # type: ignore[assignment]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}",
                "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(120)
    return driver


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 180.0) -> Any:
    """Poll ``probe`` every 0.5 s until it returns something truthy; raise ``AssertionError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def open_app(driver: Any, url: str) -> None:
    """Load the frontend and wait until the graph, the pack's extension and the node definitions are there.

    A workflow loaded before the node definitions arrive is reported as "missing nodes".
    """
    driver.get(url)
    wait_for(
        "the frontend, the lorax extension and the node definitions",
        lambda: driver.execute_script(
            f"const app = {APP}; return !!(app?.graph && app.extensions?.some((e) => e.name === '{EXTENSION}')"
            " && window.LiteGraph?.registered_node_types?.LoraXTransferLoRA"
            " && window.LiteGraph.registered_node_types.CheckpointLoaderSimple);"
        ),
    )
    close_dialogs(driver)


def close_dialogs(driver: Any) -> None:
    """Remove the frontend's modal dialogs (a fresh user folder opens the template browser on the first visit)."""
    driver.execute_script("document.querySelectorAll('.p-dialog-mask').forEach((e) => e.remove());")


def load_graph(driver: Any, workflow: Mapping[str, Any]) -> None:
    """Open a UI-format workflow as if it was dropped on the canvas."""
    driver.execute_async_script(
        f"const done = arguments[arguments.length - 1]; {APP}.loadGraphData(arguments[0]).then(() => done(true));",
        workflow,
    )


def queue(driver: Any) -> None:
    """Press Queue (one run of the open workflow)."""
    driver.execute_async_script(f"const done = arguments[arguments.length - 1]; {APP}.queuePrompt(0, 1).then(done);")
