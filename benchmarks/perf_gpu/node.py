"""The node step of :mod:`benchmarks.perf_gpu.run`: Transfer LoRA inside an in-process ComfyUI, in a child process.

    python -m benchmarks.perf_gpu.node --spec RUN/spec.json --result R.json

ComfyUI (``spec["comfyui"]``) is imported as ``tests/nodes/comfy_harness.py`` does it, except that
``--cpu`` is set only for ``--device cpu``: on a GPU machine ComfyUI picks ``cuda:0`` itself. The pack
is loaded by ComfyUI's own loader; the run folder is registered as a ``diffusion_models`` and
``loras`` folder and a fresh folder as ComfyUI's user folder (so the node's disk cache starts empty).

The target is loaded by ``comfy.sd.load_diffusion_model`` and moved to the compute device with
``comfy.model_management.load_models_gpu``, where ComfyUI keeps it after sampling. Then, timed:
Load Source Model (LoRA-X), and Transfer LoRA on LoRA A (``cold``: the cache is filled) and on LoRA B
(``warm``: the cache is full; the node's memory cache in front of its disk cache serves what it
kept), ``use_cache`` on, the CLI's rank and threshold. Peak extra VRAM is
``torch.cuda.max_memory_allocated`` beyond what was allocated before each transfer (the model);
retained VRAM is what is still allocated after it.
Untimed: the node's ΔW per layer and its layer statuses against the CLI's outputs for the same LoRA.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.perf.generate import lora_name
from benchmarks.perf.worker import output_delta

from .steps import error_stats, rel_err, report_statuses

__all__ = ["import_comfyui", "run_node"]


def import_comfyui(root: Path, device: str) -> Any:
    """Import ComfyUI from ``root`` (CPU mode only for ``device == "cpu"``), load the pack; returns ``nodes``."""
    sys.path.insert(0, str(root))
    import comfy.cli_args  # noqa: TID251

    comfy.cli_args.args.cpu = torch.device(device).type == "cpu"
    import nodes as comfy_nodes  # ComfyUI's nodes.py: its root is first on sys.path

    link = root / "custom_nodes" / "comfyui_lorax"
    pack = link if link.exists() else Path(__file__).resolve().parents[2]
    if not asyncio.run(comfy_nodes.load_custom_node(str(pack))):
        raise RuntimeError(f"ComfyUI could not load the pack from {pack}; see the log")
    return comfy_nodes


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _node_deltas(lora: Any) -> dict[str, torch.Tensor]:
    """ΔW per kohya layer name of the node's ``LORA_MODEL`` (its factors keyed by target model key)."""
    out = {}
    for key, f in lora.factors.items():
        model_key = key.removeprefix("diffusion_model.")
        out[lora_name(model_key)] = f.scale * (f.up2d().double() @ f.down2d().double())
    return out


def run_node(spec: dict[str, Any]) -> dict[str, object]:
    """Load the target in ComfyUI, run the nodes cold and warm; figures and agreement with the CLI."""
    device = str(spec["device"])
    run = Path(spec["run"])
    t = time.perf_counter()
    comfy_nodes = import_comfyui(Path(spec["comfyui"]), device)
    import comfy.model_management  # noqa: TID251
    import comfy.sd  # noqa: TID251
    import folder_paths  # noqa: TID251

    import_s = time.perf_counter() - t
    user = run / "comfy_user"
    user.mkdir(parents=True, exist_ok=True)
    folder_paths.set_user_directory(str(user))
    for folder in ("diffusion_models", "loras"):
        folder_paths.add_model_folder_path(folder, str(run), is_default=True)
    comfy_device = str(comfy.model_management.get_torch_device())

    t = time.perf_counter()
    target = comfy.sd.load_diffusion_model(str(run / "target.safetensors"))
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    comfy.model_management.load_models_gpu([target])
    _sync(device)
    to_device_s = time.perf_counter() - t
    cuda = torch.device(device).type == "cuda"
    held_gb = torch.cuda.memory_allocated() / 1e9 if cuda else None

    t = time.perf_counter()
    source = comfy_nodes.NODE_CLASS_MAPPINGS["LoraXLoadSourceModel"].execute("source.safetensors").result[0]
    source_s = time.perf_counter() - t
    transfer = comfy_nodes.NODE_CLASS_MAPPINGS["LoraXTransferLoRA"]
    runs: dict[str, dict[str, object]] = {}
    for label, lora_file, cli in (
        ("cold", "lora_a.safetensors", "cli_cold"),
        ("warm", "lora_b.safetensors", "cli_warm"),
    ):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        lora = transfer.execute(
            source=source,
            target=target,
            lora_name=lora_file,
            method="auto",
            rank=int(spec["rank"]),
            threshold=float(spec["threshold"]),
            use_cache=True,
        ).result[0]
        _sync(device)
        seconds = time.perf_counter() - t
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        totals = lora.report.totals()
        runs[label] = {
            "seconds": seconds,
            "cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
            "peak_extra_vram_gb": (torch.cuda.max_memory_allocated() - before) / 1e9 if cuda else None,
            "retained_vram_gb": (torch.cuda.memory_allocated() - before) / 1e9 if cuda else None,
            "transferred": totals["transferred"],
            "skipped": totals["skipped"],
            **_agreement(lora, spec, cli),
        }
    return {
        "comfy_device": comfy_device,
        "import_comfyui_s": import_s,
        "load_target_s": load_s,
        "target_to_device_s": to_device_s,
        "vram_held_by_comfyui_gb": held_gb,
        "load_source_node_s": source_s,
        **runs,
    }


def _agreement(lora: Any, spec: dict[str, Any], cli: str) -> dict[str, object]:
    """The node's ΔW and layer statuses against the CLI's output for the same LoRA (when it exists)."""
    path = Path(spec["outputs"][cli]["path"])
    report = Path(spec["reports"][cli])
    if not path.exists() or not report.exists():
        return {"vs_cli": None, "status_mismatches_vs_cli": None}
    statuses = report_statuses(report)
    node_statuses = {r.key: r.status for r in lora.report.layers}
    errors = {}
    for name, got in _node_deltas(lora).items():
        want = output_delta(path, name)
        if want is not None:
            errors[name] = rel_err(got, want.double())
    return {
        "vs_cli": error_stats(errors),
        "status_mismatches_vs_cli": sorted(k for k in statuses if statuses[k] != node_statuses.get(k)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spec", type=Path, required=True, help="the run's spec.json (written by run.py)")
    p.add_argument("--result", type=Path, required=True)
    args = p.parse_args(argv)
    res = run_node(json.loads(args.spec.read_text()))
    args.result.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
