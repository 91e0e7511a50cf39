"""GPU benchmark of LoRA transfer at SD1.5/SDXL scale (issue 9): every GPU step in one command.

    python -m benchmarks.perf_gpu --device cuda --out DIR                    # SDXL, then SD1.5, every LoRA layer
    python -m benchmarks.perf_gpu --device cuda --out DIR --stride sdxl=12   # every 12th SDXL LoRA layer
    python -m benchmarks.perf_gpu --device cpu --tiny --out DIR              # smoke run (tests/perf), < 1 min

Per family it generates (or reuses) the full-size random fp16 models of :mod:`benchmarks.perf.generate`
and writes two kohya LoRAs (A and B, ``--lora-rank``) on the measured attention/feed-forward layers
into ``WORK/perf_gpu/<family>/``, then runs these steps, each in its own process and time-boxed (a step
that fails or runs out of time is recorded and the next one still runs; ``--budget-s`` bounds them all):

1. ``probe`` – ``python -c "import torch"`` plus a CUDA context, best of two runs (one with ``--tiny``):
   the interpreter start that "excluding interpreter start" subtracts; it also reports the card,
   torch and CUDA versions.
2. ``cli_cold`` / ``cli_warm`` – ``python -m lorax_core transfer --device …`` as a user runs it, with
   a fresh cache folder (LoRA A), then with that cache filled (LoRA B): process wall and CPU time.
3. ``inproc_cold`` / ``inproc_warm`` – the same pipeline in-process (:mod:`benchmarks.perf_gpu.inproc`,
   CUDA context created before its timer): seconds, process CPU time and where they go (read weights,
   decompose, cache I/O, maths, write).
4. ``naive`` – the paper's recipe on the device, same layers (:mod:`benchmarks.perf_gpu.steps`).
5. ``accuracy`` – every output against a float64 reference, and the skip decisions.
6. ``node`` – Transfer LoRA inside an in-process ComfyUI on the device (:mod:`benchmarks.perf_gpu.node`).

Results: ``DIR/perf_gpu.json`` (rewritten after every step, so an interrupted run keeps what it
measured) and ``DIR/PERF_GPU.md``; each step's output in ``DIR/logs/``. ``--tiny`` uses the tiny
SD1.5-shaped UNet of ``scripts/make_tiny_models.py`` (ComfyUI detects it, so the node step runs too),
or, when ComfyUI cannot be imported, the ``tiny`` family of :mod:`benchmarks.perf.shapes` without
the node step (the json says why).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from benchmarks.perf.generate import ensure_family, write_lora
from benchmarks.perf.run import machine, parse_strides
from benchmarks.perf.shapes import lora_layer_keys, unet_shapes
from lorax_core.library import EXIT_PARTIAL

from .render import render, targets

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("benchmarks.perf_gpu")

THRESHOLD = 0.5  # c of the decision rule: the product's default, used by every step
#: Upper time limit of each step (seconds); each also ends where --budget-s runs out.
STEP_CAPS = {
    "prepare": 900.0,  # model generation (a child process), LoRAs A and B, reading the models once
    "probe": 60.0,
    "cli_cold": 240.0,
    "cli_warm": 240.0,
    "inproc_cold": 240.0,
    "inproc_warm": 240.0,
    "naive": 300.0,
    "accuracy": 180.0,
    "node": 360.0,
}
MIN_STEP_S = 10.0  # a step with less time than this left is skipped, not started
# Smoke mode. One thread: on a shared 2-core machine, two OpenMP threads under load made small
# decompositions take seconds instead of milliseconds (tests/nodes/conftest.py measured the same).
TINY = {"rank": 32, "lora_rank": 8, "stride": 3, "threads": 1}
# Interpreter start as the CLI pays it: Python, torch, and a CUDA context on a GPU device.
PROBE = """
import json, sys, torch
dev = torch.device(sys.argv[1])
torch.zeros(1, device=dev).sum().item()
cuda = dev.type == "cuda"
print(json.dumps({"card": torch.cuda.get_device_name(dev) if cuda else None, "torch": torch.__version__,
                  "cuda": torch.version.cuda, "device_count": torch.cuda.device_count() if cuda else 0}))
"""


class StepSkipped(Exception):  # noqa: N818 - a control-flow signal, recorded as status "skipped"
    """A step that cannot run here (no ComfyUI, a step it needs failed); the message says why."""


def comfy_root() -> Path | None:
    """The ComfyUI host (``LORAX_COMFYUI``, default ``.comfyui``), or ``None`` when it is not there."""
    root = Path(os.environ.get("LORAX_COMFYUI", ROOT / ".comfyui")).resolve()
    return root if (root / "main.py").is_file() and (root / "comfy").is_dir() else None


def git_commit() -> str | None:
    """``HEAD`` (``+dirty`` with uncommitted changes), else ``$LORAX_GIT_COMMIT`` (a copy without .git)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=20
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT, capture_output=True, text=True, check=True, timeout=20,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("LORAX_GIT_COMMIT") or None
    return head + ("+dirty" if dirty else "")


def _tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


class Runner:
    """Runs the steps with their time limits and keeps the json (and the markdown) up to date."""

    def __init__(self, out: Path, result: dict[str, object], budget_s: float, threads: int) -> None:
        self.out = out
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.result = result
        self.deadline = time.monotonic() + budget_s if budget_s > 0 else None

    def left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def write(self) -> None:
        for name, text in (
            ("perf_gpu.json", json.dumps(self.result, indent=2) + "\n"),
            ("PERF_GPU.md", render(self.result)),
        ):
            tmp = self.out / f".{name}.partial"
            tmp.write_text(text)
            tmp.replace(self.out / name)

    def child(self, cmd: list[str], log_name: str, timeout: float) -> float:
        """Run ``cmd`` from the repo root, output to ``logs/<log_name>.log``; returns its wall time.

        Raises:
            subprocess.TimeoutExpired: it ran past ``timeout`` (it is killed).
            RuntimeError: it exited non-zero; the message ends with its output's tail.
        """
        path = self.logs / f"{log_name}.log"
        with path.open("w") as fh:
            t = time.perf_counter()
            proc = subprocess.run(
                cmd, cwd=ROOT, env=self.env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, check=False
            )
            wall = time.perf_counter() - t
        if proc.returncode not in (0, EXIT_PARTIAL):  # a transfer with skipped layers is a result, not a failure
            raise RuntimeError(f"exit status {proc.returncode}; output tail:\n{_tail(path)}")
        return wall

    def step(self, fam: dict[str, object], name: str, into: tuple[str, ...], fn: Callable[[float], object]) -> None:
        """Run one step (``fn(timeout)``), store its figures at ``fam[into…]`` and its status in ``fam["steps"]``."""
        steps: dict[str, object] = fam.setdefault("steps", {})  # type: ignore[assignment]
        left = self.left()
        record: dict[str, object] = {}
        t = time.perf_counter()
        try:
            if left is not None and left < MIN_STEP_S:
                raise StepSkipped(f"time budget exhausted ({left:.0f} s left)")
            timeout = STEP_CAPS[name] if left is None else min(STEP_CAPS[name], left - 2.0)
            record["timeout_s"] = round(timeout, 1)
            log.info("%s: %s (up to %.0f s)", fam["family"], name, timeout)
            value = fn(timeout)
            node: dict[str, object] = fam
            for part in into[:-1]:
                node = node.setdefault(part, {})  # type: ignore[assignment]
            node[into[-1]] = value
            record["status"] = "ok"
        except StepSkipped as exc:
            record.update(status="skipped", error=str(exc))
        except subprocess.TimeoutExpired as exc:
            record.update(status="timeout", error=f"killed after {exc.timeout:.0f} s")
        except Exception as exc:  # every failure is recorded; the next step still runs
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}"[-4000:])
        except BaseException as exc:  # SIGTERM (see main) or ^C: record it, stop the run
            record.update(status="interrupted", error=str(exc))
            raise
        finally:
            record["wall_s"] = round(time.perf_counter() - t, 2)
            steps[name] = record
            if record.get("status") != "ok":
                log.warning("%s: %s %s: %s", fam["family"], name, record.get("status"), record.get("error", "")[-300:])
            self.write()


def require_ok(fam: dict[str, object], *names: str) -> None:
    """Raise :class:`StepSkipped` unless every named step of ``fam`` succeeded."""
    steps: dict[str, dict[str, object]] = fam.get("steps", {})  # type: ignore[assignment]
    for name in names:
        if steps.get(name, {}).get("status") != "ok":
            raise StepSkipped(f"needs {name}, which did not succeed")


# ----------------------------------------------------------------------------- models and inputs


def tiny_models(timeout: float = 600.0) -> tuple[Path, Path, str | None]:
    """(source, target, None) of the tiny SD1.5 UNet of scripts/make_tiny_models.py, generated if needed.

    Without an importable ComfyUI: the ``tiny`` family of benchmarks.perf (which ComfyUI does not
    detect as any model) and the reason the node step cannot run.
    """
    from scripts.make_tiny_models import DEFAULT_OUT, paths

    models = paths(DEFAULT_OUT)
    if (DEFAULT_OUT / "done.json").is_file() and models.source_unet.is_file() and models.target_unet.is_file():
        return models.source_unet, models.target_unet, None  # generated before (by the node tests, say)
    if comfy_root() is None:
        reason = "ComfyUI is not importable here (no LORAX_COMFYUI or .comfyui)"
    else:
        proc = subprocess.run(
            [sys.executable, "scripts/make_tiny_models.py"], cwd=ROOT, capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip
        if proc.returncode == 0:
            return models.source_unet, models.target_unet, None
        reason = f"ComfyUI is not importable here: scripts/make_tiny_models.py failed: {proc.stderr[-1000:]}"
    return Path(), Path(), reason


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` from a safetensors header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def models_for(family: str, work: Path) -> tuple[Path, Path, dict[str, tuple[int, ...]], str, str | None]:
    """(source, target, shapes, origin, reason the node step cannot run or None) of one family."""
    if family == "tiny":
        source, target, reason = tiny_models()
        if reason is None:
            return source, target, header_shapes(source), "scripts/make_tiny_models.py (tiny SD1.5 UNet)", None
    else:
        reason = None
    fam_dir = ensure_family(work, family, log.info)
    return (
        fam_dir / "source.safetensors",
        fam_dir / "target.safetensors",
        unet_shapes(family),
        f"benchmarks.perf.generate ({family})",
        reason,
    )


def prepare(family: str, args: argparse.Namespace, stride: int) -> tuple[dict[str, object], dict[str, object]]:
    """Models, the measured layers, LoRAs A and B and the run folder; returns (json inputs, spec)."""
    source, target, shapes, origin, node_reason = models_for(family, args.work)
    root = comfy_root()
    if root is None:
        node_reason = node_reason or "ComfyUI not found (LORAX_COMFYUI, .comfyui)"
    all_keys = lora_layer_keys(shapes)
    keys = sorted(all_keys)[::stride]
    run = (args.work / "perf_gpu" / family).resolve()
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    (run / "source.safetensors").symlink_to(source.resolve())
    (run / "target.safetensors").symlink_to(target.resolve())
    for tag in ("a", "b"):
        write_lora(run / f"lora_{tag}.safetensors", family, keys, shapes, args.lora_rank, tag)
    for path in (source, target):  # the same page-cache state for every step
        with path.open("rb") as fh:
            while fh.read(64 << 20):
                pass
    outputs = {"cli_cold": "a", "cli_warm": "b", "inproc_cold": "a", "inproc_warm": "b"}  # output: its LoRA
    spec: dict[str, object] = {
        "family": family,
        "device": args.device,
        "run": str(run),
        "rank": args.rank,
        "threshold": THRESHOLD,
        "lora_a": str(run / "lora_a.safetensors"),
        "lora_b": str(run / "lora_b.safetensors"),
        "keys": keys,
        "outputs": {label: {"path": str(run / f"{label}.safetensors"), "lora": tag} for label, tag in outputs.items()},
        "reports": {label: str(run / f"{label}.report.json") for label in ("cli_cold", "cli_warm")},
        "accuracy_layers": args.accuracy_layers,
        "comfyui": str(root) if root else None,
        "node_skip_reason": node_reason,
    }
    (run / "spec.json").write_text(json.dumps(spec, indent=2))
    inputs = {
        "models": origin,
        "source": str(source),
        "target": str(target),
        "model_file_mb": round(source.stat().st_size / 2**20, 1),
        "layers_total": len(all_keys),
        "layers_measured": len(keys),
        "subset": "all LoRA layers" if stride == 1 else f"1 in {stride} of the sorted LoRA layer names",
        "lora_rank": args.lora_rank,
        "rank_R": args.rank,
        "threshold_c": THRESHOLD,
    }
    return inputs, spec


# ----------------------------------------------------------------------------- steps


def run_family(runner: Runner, family: str, args: argparse.Namespace, stride: int) -> None:
    fam: dict[str, object] = {"family": family}
    device, py = args.device, sys.executable
    runner.result["families"][family] = fam  # type: ignore[index]
    spec: dict[str, object] = {}

    def prep(timeout: float) -> dict[str, object]:
        if family != "tiny":  # generating a full-size pair takes minutes: in a child, so it is time-boxed
            generate = ["-m", "benchmarks.perf_gpu", "--generate-only", "--families", family]
            runner.child([py, *generate, "--work", str(args.work)], f"{family}-generate", timeout)
        inputs, made = prepare(family, args, stride)
        spec.update(made)
        return inputs

    runner.step(fam, "prepare", ("inputs",), prep)
    if not spec:
        return
    run = Path(str(spec["run"]))

    def probe(timeout: float) -> dict[str, object]:
        walls, info = [], {}
        for i in range(1 if args.tiny else 2):
            walls.append(runner.child([py, "-c", PROBE, device], f"{family}-probe{i}", timeout / 2))
            lines = (runner.logs / f"{family}-probe{i}.log").read_text().splitlines()
            info = json.loads(next(line for line in reversed(lines) if line.startswith("{")))
        runner.result["machine"].update(info)  # type: ignore[attr-defined]
        return {"seconds": min(walls), "runs_s": walls, "what": "python -c 'import torch' + a tensor on the device"}

    def cli(label: str, lora: str, needs: tuple[str, ...]) -> Callable[[float], dict[str, object]]:
        def go(timeout: float) -> dict[str, object]:
            require_ok(fam, *needs)
            out, report = run / f"{label}.safetensors", run / f"{label}.report.json"
            cmd = [py, "-m", "lorax_core", "transfer", "--source", str(run / "source.safetensors"),
                   "--target", str(run / "target.safetensors"), "--lora", str(run / f"lora_{lora}.safetensors"),
                   "--out", str(out), "--report", str(report), "--rank", str(args.rank), "--threshold",
                   str(THRESHOLD), "--device", device, "--cache-dir", str(run / "cache_cli"), "--quiet",
                   "--overwrite"]  # fmt: skip
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            wall = runner.child(cmd, f"{family}-{label}", timeout)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            startup = fam.get("startup", {}).get("seconds")  # type: ignore[attr-defined]
            layers = json.loads(report.read_text())
            return {
                "wall_s": wall,
                "excl_start_s": None if startup is None else wall - startup,
                "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
                **layers["totals"],
                "methods": dict(Counter(r["method"] for r in layers["layers"] if r["status"] == "transferred")),
                "output_mb": round(out.stat().st_size / 2**20, 1),
            }

        return go

    def inproc(label: str, lora: str, needs: tuple[str, ...]) -> Callable[[float], dict[str, object]]:
        def go(timeout: float) -> dict[str, object]:
            require_ok(fam, *needs)
            result = run / f"{label}.json"
            cmd = [py, "-m", "benchmarks.perf_gpu.inproc", "--spec", str(run / "spec.json"), "--lora", lora,
                   "--cache", str(run / "cache_inproc"), "--out", str(run / f"{label}.safetensors"), "--result",
                   str(result)]  # fmt: skip
            wall = runner.child(cmd, f"{family}-{label}", timeout)
            return {**json.loads(result.read_text()), "process_wall_s": wall}

        return go

    def child_step(
        module: str, mode: list[str], label: str, skip: object = None
    ) -> Callable[[float], dict[str, object]]:
        def go(timeout: float) -> dict[str, object]:
            if skip:
                raise StepSkipped(str(skip))
            result = run / f"{label}.json"
            # The accuracy step stops checking layers in time to write its result.
            limit = ["--time-limit", str(max(1.0, timeout - 20.0))] if mode == ["accuracy"] else []
            cmd = [py, "-m", module, *mode, "--spec", str(run / "spec.json"), "--result", str(result), *limit]
            wall = runner.child(cmd, f"{family}-{label}", timeout)
            return {**json.loads(result.read_text()), "process_wall_s": wall}

        return go

    runner.step(fam, "probe", ("startup",), probe)
    runner.step(fam, "cli_cold", ("cli", "cold"), cli("cli_cold", "a", ()))
    runner.step(fam, "cli_warm", ("cli", "warm"), cli("cli_warm", "b", ("cli_cold",)))
    runner.step(fam, "inproc_cold", ("inproc", "cold"), inproc("inproc_cold", "a", ()))
    runner.step(fam, "inproc_warm", ("inproc", "warm"), inproc("inproc_warm", "b", ("inproc_cold",)))
    runner.step(fam, "naive", ("naive",), child_step("benchmarks.perf_gpu.steps", ["naive"], "naive"))
    runner.step(fam, "accuracy", ("accuracy",), child_step("benchmarks.perf_gpu.steps", ["accuracy"], "accuracy"))
    runner.step(fam, "node", ("node",), child_step("benchmarks.perf_gpu.node", [], "node", spec["node_skip_reason"]))
    fam["targets"] = targets(fam)
    runner.write()
    _clean(run)


def _clean(run: Path) -> None:
    """Delete the run's big files (outputs, LoRAs, caches); its json files stay."""
    for path in run.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.suffix == ".safetensors":
            path.unlink()


# ----------------------------------------------------------------------------- main


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf_gpu", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="where the maths runs (default: %(default)s)")
    p.add_argument("--out", type=Path, help="folder for perf_gpu.json, PERF_GPU.md and logs/ (required)")
    p.add_argument("--families", nargs="+", default=["sdxl", "sd15"], choices=["sdxl", "sd15", "tiny"])
    p.add_argument("--stride", nargs="*", default=[], help="FAMILY=N: measure every N-th LoRA layer only")
    p.add_argument("--rank", type=int, default=320, help="subspace rank R (default: %(default)s, the paper's)")
    p.add_argument("--lora-rank", type=int, default=32, help="rank of LoRAs A and B (default: %(default)s)")
    p.add_argument(
        "--accuracy-layers",
        type=int,
        default=96,
        help="float64 reference on at most N layers, evenly spread; 0: all (default: %(default)s)",
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads of every step (OMP_NUM_THREADS); 0: default")
    p.add_argument("--budget-s", type=float, default=0.0, help="time limit of all steps together; 0: none")
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work", help="generated models and run files")
    p.add_argument("--generate-only", action="store_true", help="generate (or reuse) the models, then stop")
    p.add_argument("--tiny", action="store_true", help="smoke mode: a tiny SD1.5-shaped UNet, R = 32, LoRA rank 8")
    args = p.parse_args(argv)
    if args.out is None and not args.generate_only:
        p.error("--out is required (unless --generate-only)")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    strides = parse_strides(args.stride)
    if args.tiny:
        args.families, args.rank, args.lora_rank = ["tiny"], TINY["rank"], TINY["lora_rank"]
        args.threads = args.threads or TINY["threads"]
        strides.setdefault("tiny", TINY["stride"])
    args.work = args.work.resolve()
    if args.generate_only:
        for family in args.families:
            models_for(family, args.work)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.perf_gpu " + " ".join(argv if argv is not None else sys.argv[1:])
    result: dict[str, object] = {
        "command": command.strip(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": git_commit(),
        "machine": {**machine(), "card": None},
        "options": {
            "device": args.device,
            "families": args.families,
            "strides": {f: strides.get(f, 1) for f in args.families},
            "rank": args.rank,
            "lora_rank": args.lora_rank,
            "accuracy_layers": args.accuracy_layers,
            "budget_s": args.budget_s,
            "threads": args.threads or "default",
            "tiny": args.tiny,
        },
        "comfyui": str(comfy_root()) if comfy_root() else None,
        "families": {},
    }
    runner = Runner(args.out, result, args.budget_s, args.threads)
    runner.write()
    # A SIGTERM (an outer time limit) raises here: the running step's child is killed by
    # subprocess.run, the step is recorded as interrupted and the json written before exiting.
    signal.signal(signal.SIGTERM, _stop)
    try:
        for family in args.families:
            run_family(runner, family, args, strides.get(family, 1))
    finally:
        result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        runner.write()
    log.info("wrote %s and %s", args.out / "perf_gpu.json", args.out / "PERF_GPU.md")
    return 0
