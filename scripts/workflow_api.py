"""Run ComfyUI workflows headless: UI → API conversion, validation against /object_info, a server, /prompt + /history.

Used by the demo (``scripts/demo.py``) and the integration tests (``tests/integration``).

* :func:`ui_to_api` turns a workflow saved by the ComfyUI frontend (the drag-and-drop "UI"
  format: ``nodes`` with positional ``widgets_values`` and ``links``) into the API ("prompt")
  format ``/prompt`` accepts, using the running server's ``/object_info`` for the input order.
* :func:`validate_api` checks an API prompt against ``/object_info`` (known node types, required
  inputs, combo values, link targets and socket types) and returns readable problems.
* :class:`HeadlessComfy` starts ``main.py --cpu`` on a free port with an
  ``extra_model_paths`` yaml, queues prompts and waits for their ``/history`` entry.

Only the standard library is used, so the demo needs nothing beyond ComfyUI's own venv.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Frontend-only nodes that never reach the server.
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MUTED_MODES = {2, 4}  # 2 = muted ("never"), 4 = bypassed


class WorkflowError(Exception):
    """A workflow cannot be converted, validated or run; the message says which node and why."""


def _spec(info: Mapping[str, Any], name: str) -> tuple[Any, dict[str, Any]]:
    inputs = info["input"]
    entry = inputs.get("required", {}).get(name) or inputs.get("optional", {}).get(name)
    return entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {})


def _is_widget(kind: Any) -> bool:
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _input_order(info: Mapping[str, Any]) -> list[str]:
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    return [*order.get("required", []), *order.get("optional", [])]


def ui_to_api(workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Convert a UI-format workflow to an API prompt.

    Widget values are assigned to widget inputs in ``/object_info`` order (required, then
    optional); an INT with ``control_after_generate`` is followed by one extra UI-only value
    (``fixed``/``randomize``…), which is skipped. A widget converted to a socket and linked
    still has its value in ``widgets_values``; the link wins.

    Raises:
        WorkflowError: an unknown node type, or fewer widget values than widget inputs.
    """
    links = {link[0]: link for link in workflow.get("links", [])}
    api: dict[str, dict[str, Any]] = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in FRONTEND_ONLY or node.get("mode", 0) in MUTED_MODES:
            continue
        if kind not in object_info:
            raise WorkflowError(f"node {node['id']} ({kind}): this ComfyUI has no such node; install its pack.")
        info = object_info[kind]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs: dict[str, Any] = {}
        for name in _input_order(info):
            kind_, opts = _spec(info, name)
            if _is_widget(kind_) and not opts.get("forceInput"):
                if not values:
                    raise WorkflowError(f"node {node['id']} ({kind}): no widget value left for input {name!r}.")
                inputs[name] = values.pop(0)
                if opts.get("control_after_generate") and values:
                    values.pop(0)
            if name in linked:
                link = linked[name]
                inputs[name] = [str(link[1]), int(link[2])]
        entry = {"class_type": kind, "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        api[str(node["id"])] = entry
    return api


def _types_fit(produced: str, accepted: str) -> bool:
    if "*" in (produced, accepted):
        return True
    return bool(set(produced.split(",")) & set(accepted.split(",")))


def validate_api(api: Mapping[str, Mapping[str, Any]], object_info: Mapping[str, Any]) -> list[str]:
    """Problems a prompt would hit on this server (empty list: it fits), checked without running it."""
    problems: list[str] = []
    for node_id, node in api.items():
        kind = node["class_type"]
        info = object_info.get(kind)
        if info is None:
            problems.append(f"node {node_id}: unknown node type {kind}")
            continue
        for name in info["input"].get("required", {}):
            if name not in node["inputs"]:
                problems.append(f"node {node_id} ({kind}): required input {name!r} is missing")
        for name, value in node["inputs"].items():
            if name not in _input_order(info):
                problems.append(f"node {node_id} ({kind}): no input named {name!r}")
                continue
            kind_, opts = _spec(info, name)
            if isinstance(value, list):
                source = api.get(value[0])
                if source is None:
                    problems.append(f"node {node_id} ({kind}): input {name!r} links to missing node {value[0]}")
                    continue
                outputs = object_info.get(source["class_type"], {}).get("output", [])
                if value[1] >= len(outputs):
                    problems.append(f"node {node_id} ({kind}): input {name!r} links to a missing output slot")
                elif not _types_fit(str(outputs[value[1]]), "COMBO" if isinstance(kind_, list) else str(kind_)):
                    problems.append(f"node {node_id} ({kind}): input {name!r} wants {kind_}, gets {outputs[value[1]]}")
                continue
            options = kind_ if isinstance(kind_, list) else opts.get("options")
            if options is not None and value not in options:
                problems.append(f"node {node_id} ({kind}): {name}={value!r} is not one of the listed choices")
    return problems


def set_inputs(api: dict[str, dict[str, Any]], class_type: str, **values: Any) -> None:
    """Override widget values of every node of ``class_type`` (e.g. a small image size for tiny models)."""
    hits = [n for n in api.values() if n["class_type"] == class_type]
    if not hits:
        raise WorkflowError(f"the workflow has no {class_type} node to set {sorted(values)} on.")
    for node in hits:
        node["inputs"].update(values)


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HeadlessComfy:
    """A ComfyUI server started as a subprocess, with the pack's models and a private output folder.

    Args:
        comfy_root: the ComfyUI folder (holds ``main.py``).
        work: a scratch folder: ``extra_model_paths.yaml``, ``output/``, ``temp/``, ``user/``,
            ``loras/`` (the first loras folder: where the save node writes) and ``server.log``.
        models: a folder laid out like ComfyUI's ``models`` (``checkpoints``, ``loras``…).
        python: the interpreter (default: this one).
        threads: when set, ``OMP_NUM_THREADS`` for the server (tests use 1 on shared machines).
    """

    def __init__(self, comfy_root: Path, work: Path, models: Path, python: str | None = None,
                 threads: int | None = None) -> None:
        self.comfy_root, self.work, self.models = Path(comfy_root), Path(work), Path(models)
        self.python = python or sys.executable
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = self.work / "output"
        self.loras = self.work / "loras"
        self.log_path = self.work / "server.log"
        self.client_id = uuid.uuid4().hex
        self._proc: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if threads is not None:
            self.env["OMP_NUM_THREADS"] = str(threads)

    def _write_paths(self) -> Path:
        for d in (self.output, self.loras, self.work / "temp", self.work / "user"):
            d.mkdir(parents=True, exist_ok=True)
        yaml = self.work / "extra_model_paths.yaml"
        # is_default puts the scratch loras folder first: the save node writes there.
        yaml.write_text(
            "lorax_output:\n"
            "  is_default: true\n"
            f"  loras: {self.loras}\n"
            "lorax_models:\n"
            f"  base_path: {self.models}\n"
            "  checkpoints: checkpoints\n"
            "  diffusion_models: diffusion_models\n"
            "  loras: loras\n"
        )
        return yaml

    def command(self, *extra: str) -> list[str]:
        """The ``main.py`` command line (``extra`` appended)."""
        return [
            self.python, "main.py", "--cpu", "--disable-api-nodes", "--disable-auto-launch",
            "--extra-model-paths-config", str(self._write_paths()),
            "--output-directory", str(self.output), "--temp-directory", str(self.work / "temp"),
            "--user-directory", str(self.work / "user"), *extra,
        ]

    def start(self, timeout: float = 240.0) -> HeadlessComfy:
        """Start the server and wait until our nodes are registered."""
        self.work.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
            self._proc = subprocess.Popen(
                self.command("--listen", "127.0.0.1", "--port", str(self.port)),
                cwd=self.comfy_root, stdout=log, stderr=subprocess.STDOUT, env=self.env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise WorkflowError(f"ComfyUI exited with code {self._proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/object_info/LoraXTransferLoRA")
                return self
            except (urllib.error.URLError, ConnectionError, WorkflowError):
                time.sleep(0.5)
        self.stop()
        raise WorkflowError(f"ComfyUI did not come up within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the server (terminate, then kill after 20 s)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def get(self, path: str) -> Any:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise WorkflowError(f"GET {path}: HTTP {e.code}") from None

    def view(self, image: Mapping[str, str]) -> bytes:
        """The bytes of an image listed in a history entry (``filename``, ``subfolder``, ``type``)."""
        query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{self.url}/view?{query}", timeout=30) as r:
            return r.read()

    def object_info(self) -> dict[str, Any]:
        return self.get("/object_info")

    def queue(self, api: Mapping[str, Any], workflow: Mapping[str, Any] | None = None) -> str:
        """POST a prompt; return its id. Any validation error raises with the server's node errors."""
        body: dict[str, Any] = {"prompt": api, "client_id": self.client_id}
        if workflow is not None:
            body["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        req = urllib.request.Request(
            self.url + "/prompt", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                answer = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise WorkflowError(f"/prompt refused the workflow: {e.read().decode(errors='replace')}") from None
        if answer.get("node_errors"):
            # ComfyUI still runs the outputs that validated; we treat any node error as a failure.
            raise WorkflowError(f"/prompt found invalid nodes: {json.dumps(answer['node_errors'])}")
        return str(answer["prompt_id"])

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict[str, Any]:
        """Poll ``/history/<id>`` until the prompt finished (successfully or not); return its entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                entry["status"]["completed"] or entry["status"].get("status_str") == "error"
            ):
                return entry
            if self._proc is not None and self._proc.poll() is not None:
                raise WorkflowError(f"ComfyUI died while running prompt {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.25)
        raise WorkflowError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, api: Mapping[str, Any], workflow: Mapping[str, Any] | None = None, timeout: float = 300.0) -> dict:
        """Queue a prompt and wait for its history entry."""
        return self.wait(self.queue(api, workflow), timeout)


def execution_error(entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``execution_error`` message data of a failed prompt, or ``None``."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def load_workflow(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
