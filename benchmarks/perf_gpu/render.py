"""Issue 9's targets, evaluated from a family's figures, and ``PERF_GPU.md`` rendered from ``perf_gpu.json``."""

from __future__ import annotations

__all__ = ["TARGETS", "render", "targets"]

#: Issue 9's targets (seconds, ratios, relative error, GB).
TARGETS = {
    "cold_wall_s": 8.0,
    "cold_excl_start_s": 3.0,
    "warm_excl_start_s": 3.0,
    "naive_ratio": 0.15,
    "rel_err": 1e-3,
    "node_ratio": 1.5,
    "extra_vram_gb": 2.0,
}
CLI_OUTPUTS = ("cli_cold", "cli_warm")
#: The in-process phases shown, in order (benchmarks.perf_gpu.inproc).
PHASES = (
    "open_and_read_lora",
    "subspaces",
    "read_base_weights",
    "cache_io",
    "decompose",
    "flush",
    "transfer_maths_and_similarity",
    "write_output",
)


def _get(tree: object, *path: str) -> object:
    """``tree[path[0]][path[1]]…``, or ``None`` where anything along the way is missing."""
    for part in path:
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _num(tree: object, *path: str) -> float | None:
    value = _get(tree, *path)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _at_most(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def _all(checks: list[bool | None]) -> bool | None:
    """False if any check failed, None if any was not measured, else True."""
    if any(c is False for c in checks):
        return False
    return None if any(c is None for c in checks) else True


def _accuracy_ok(acc: object) -> bool | None:
    if not _num(acc, "layers_checked"):
        return None
    checks: list[bool | None] = []
    for label in CLI_OUTPUTS:
        if _get(acc, "errors", label) is None:
            checks.append(None)
            continue
        worst = _num(acc, "errors", label, "max")
        checks.append(True if worst is None else worst <= TARGETS["rel_err"])  # None: every layer was skipped
        checks.append(not _get(acc, "decision_mismatches", label))
        checks.append(not _get(acc, "report_status_mismatches", label))
    return _all(checks)


def targets(fam: dict[str, object]) -> dict[str, bool | None]:
    """Issue 9's targets for one family: True met, False not met, None not measured."""
    cold_ex = _num(fam, "cli", "cold", "excl_start_s")
    naive = _num(fam, "naive", "seconds")
    node: list[bool | None] = []
    for run in ("cold", "warm"):
        got, base = _num(fam, "node", run, "seconds"), _num(fam, "inproc", run, "seconds")
        node.append(None if got is None or base is None else got <= TARGETS["node_ratio"] * base)
    vram = [_num(fam, "node", run, "peak_extra_vram_gb") for run in ("cold", "warm")]
    return {
        "CLI cold <= 8 s process wall": _at_most(_num(fam, "cli", "cold", "wall_s"), TARGETS["cold_wall_s"]),
        "CLI cold <= 3 s excluding interpreter start": _at_most(cold_ex, TARGETS["cold_excl_start_s"]),
        "CLI warm <= 3 s excluding interpreter start": _at_most(
            _num(fam, "cli", "warm", "excl_start_s"), TARGETS["warm_excl_start_s"]
        ),
        "CLI cold (excl. start) <= 0.15x naive GPU script": None
        if cold_ex is None or naive is None
        else cold_ex <= TARGETS["naive_ratio"] * naive,
        "CLI cold and warm: every checked layer within 1e-3 of float64, same skip decisions": _accuracy_ok(
            _get(fam, "accuracy")
        ),
        "node <= 1.5x CLI in-process, cold and warm": _all(node),
        "node peak extra VRAM <= 2 GB, cold and warm": _all([_at_most(v, TARGETS["extra_vram_gb"]) for v in vram]),
    }


def _f(value: object, fmt: str = ".2f") -> str:
    if isinstance(value, (bool, int)) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, float):
        return format(value, fmt)
    return str(value)


def _ratio(a: float | None, b: float | None, fmt: str = ".2f") -> str:
    return "–" if a is None or not b else format(a / b, fmt) + "×"


def _family(name: str, fam: dict[str, object]) -> list[str]:
    inp = fam.get("inputs", {})
    lines = [f"## {name}", ""]
    if inp:
        lines += [
            f"{_get(inp, 'layers_measured')} of {_get(inp, 'layers_total')} LoRA layers ({_get(inp, 'subset')}), "
            f"R = {_get(inp, 'rank_R')}, LoRA rank {_get(inp, 'lora_rank')}, c = {_get(inp, 'threshold_c')}; "
            f"models: {_get(inp, 'models')}, {_get(inp, 'model_file_mb')} MB each (fp16).",
            "",
        ]
    start = _num(fam, "startup", "seconds")
    naive = _num(fam, "naive", "seconds")
    lines += [
        "| run | process wall (s) | excl. interpreter start (s) | process CPU (s) | transferred / skipped |",
        "|---|---|---|---|---|",
        f"| interpreter + torch + device start (probe, best run) | {_f(start)} | – | – | – |",
    ]
    for run, what in (("cold", "fresh cache, LoRA A"), ("warm", "cache filled, LoRA B")):
        c = _get(fam, "cli", run)
        lines.append(
            f"| CLI {run} ({what}) | {_f(_get(c, 'wall_s'))} | {_f(_get(c, 'excl_start_s'))} | "
            f"{_f(_get(c, 'cpu_s'), '.1f')} | {_f(_get(c, 'transferred'))} / {_f(_get(c, 'skipped'))} |"
        )
    n = _get(fam, "naive")
    lines.append(
        f"| naive GPU script (paper's recipe, LoRA A) | {_f(_get(n, 'process_wall_s'))} | {_f(naive)} | "
        f"{_f(_get(n, 'process_cpu_s'), '.1f')} | {_f(_get(n, 'transferred'))} / {_f(_get(n, 'skipped'))} |"
    )
    lines += [
        "",
        f"CLI cold / naive: {_ratio(_num(fam, 'cli', 'cold', 'excl_start_s'), naive, '.3f')} "
        f"(both excluding interpreter start); naive peak VRAM {_f(_get(n, 'peak_vram_gb'))} GB.",
        "",
        "In-process, the CLI's calls (benchmarks.perf_gpu.inproc; seconds; read, cache I/O and decompose are the "
        "main thread's share of the subspaces column; reads and cache look-ups on the reader thread overlap it):",
        "",
        "| run | total | process CPU | open + read LoRA | subspaces | read weights | cache I/O | decompose | flush "
        "| maths + similarity | write | batched (batches) | peak VRAM (GB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in ("cold", "warm"):
        r = _get(fam, "inproc", run)
        ph = _get(r, "phases_s")
        cells = [_f(_get(ph, k)) for k in PHASES]
        lines.append(
            f"| {run} | {_f(_get(r, 'seconds'))} | {_f(_get(r, 'process_cpu_s'), '.1f')} | {' | '.join(cells)} | "
            f"{_f(_get(r, 'batched'))} ({_f(_get(r, 'batch_stats', 'batches'))}) | {_f(_get(r, 'peak_vram_gb'))} |"
        )
    acc = _get(fam, "accuracy")
    lines += [
        "",
        f"Accuracy: ΔW per layer vs a float64 reference ({_f(_get(acc, 'layers_checked'))} of "
        f"{_f(_get(acc, 'layers_measured'))} layers checked, evenly spread; the reference transfers "
        f"{_f(_get(acc, 'reference_transferred'))}):",
        "",
        "| output | max rel. error | median | worst layer | decision mismatches | report status mismatches |",
        "|---|---|---|---|---|---|",
    ]
    for label, errs in (_get(acc, "errors") or {}).items():  # type: ignore[union-attr]
        dec = _get(acc, "decision_mismatches", label)
        status = _get(acc, "report_status_mismatches", label)
        lines.append(
            f"| {label} | {_f(_get(errs, 'max'), '.2e')} | {_f(_get(errs, 'median'), '.2e')} | "
            f"{_f(_get(errs, 'worst_layer'))} | {len(dec) if isinstance(dec, list) else '–'} | "
            f"{len(status) if isinstance(status, list) else '–'} |"
        )
    vs = _get(n, "cli_cold_vs_naive")
    mism = _get(n, "cli_cold_decision_mismatches")
    lines += [
        "",
        f"CLI cold vs the naive float32 script (all measured layers): max {_f(_get(vs, 'max'), '.2e')}, "
        f"median {_f(_get(vs, 'median'), '.2e')}; decision mismatches "
        f"{len(mism) if isinstance(mism, list) else '–'}.",
        "",
    ]
    node = _get(fam, "node")
    lines += [
        f"Node (Transfer LoRA in an in-process ComfyUI on {_f(_get(node, 'comfy_device'))}): import ComfyUI + pack "
        f"{_f(_get(node, 'import_comfyui_s'))} s, load target {_f(_get(node, 'load_target_s'))} s, to device "
        f"{_f(_get(node, 'target_to_device_s'))} s, VRAM held by ComfyUI {_f(_get(node, 'vram_held_by_comfyui_gb'))} GB.",
        "",
        "| run | seconds | / CLI in-process | process CPU (s) | peak extra VRAM (GB) | ΔW vs CLI, max | "
        "status mismatches vs CLI |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in ("cold", "warm"):
        r = _get(node, run)
        mism = _get(r, "status_mismatches_vs_cli")
        lines.append(
            f"| {run} | {_f(_get(r, 'seconds'))} | {_ratio(_num(r, 'seconds'), _num(fam, 'inproc', run, 'seconds'))} | "
            f"{_f(_get(r, 'cpu_s'), '.1f')} | {_f(_get(r, 'peak_extra_vram_gb'))} | {_f(_get(r, 'vs_cli', 'max'), '.2e')} "
            f"| {len(mism) if isinstance(mism, list) else '–'} |"
        )
    lines += ["", "| step | status | wall (s) | note |", "|---|---|---|---|"]
    for step, rec in (fam.get("steps") or {}).items():  # type: ignore[union-attr]
        note = " ".join(str(_get(rec, "error") or "").split())[:200].replace("|", "/")
        lines.append(f"| {step} | {_get(rec, 'status')} | {_f(_get(rec, 'wall_s'), '.1f')} | {note} |")
    lines += ["", "Targets:", ""]
    verdict = {True: "met", False: "NOT met", None: "not measured"}
    for target, met in (fam.get("targets") or targets(fam)).items():  # type: ignore[union-attr]
        lines.append(f"- {target}: {verdict[met]}")
    return [*lines, ""]


def render(result: dict[str, object]) -> str:
    """``PERF_GPU.md``: the run's figures and targets, family by family."""
    m = result.get("machine", {})
    lines = [
        "# LoRA transfer on a GPU (issue 9)",
        "",
        f"Command: `{result.get('command')}`  ",
        f"Device: {_get(m, 'card') or result.get('options', {}).get('device')}; torch {_get(m, 'torch')}, "  # type: ignore[union-attr]
        f"CUDA {_get(m, 'cuda') if _get(m, 'card') else '–'}; CPU {_get(m, 'cpu')}, {_get(m, 'cores')} cores, "
        f"{_get(m, 'memory_gb')} GB; Python {_get(m, 'python')}  ",
        f"Commit: {result.get('git_commit')}; started {result.get('started')}, finished {result.get('finished', '–')}",
        "",
    ]
    for name, fam in (result.get("families") or {}).items():  # type: ignore[union-attr]
        lines += _family(name, fam)
    return "\n".join(lines)
