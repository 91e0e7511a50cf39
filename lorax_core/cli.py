"""The command line: ``python -m lorax_core transfer | similarity | inspect | cache``.

A thin host around the core, like the ComfyUI nodes: it reads files (:mod:`lorax_core.formats`,
:mod:`lorax_core.modelio`), resolves LoRA layer names to model keys, calls one core function,
writes the result, and turns the core's ``progress(done, total)`` callback into a tqdm bar.
Bad input never shows a traceback: every :class:`~lorax_core.errors.LoraxError` becomes one line
``lorax_core <command>: error: <message>`` on stderr and exit status 2. See docs/CLI.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import (
    CacheError,
    FormatError,
    LoraxError,
    OptionError,
    OutputExistsError,
)
from .formats import looks_like_lora, read_keys, read_lora, write_lora
from .formats.family import guess_family
from .formats.io import check_output_path, same_path, write_text
from .formats.resolve import KeyMap
from .library import EXIT_PARTIAL, SUMMARY_JSON, SUMMARY_MD, LibraryRow, migrate_library, transfer_status
from .lycoris import LycorisLayer
from .modelio import SafetensorsWeights, open_model
from .pipeline import file_model_info, plan_transfer, run_transfer
from .types import METHODS, LoraFactors, TransferOptions, check_device, json_safe
from .version import TOOL_VERSION

if TYPE_CHECKING:
    import torch

    from .cache import DiskCache

__all__ = ["build_parser", "main"]

PROG = "lorax_core"
#: Exit status when the reader of our output goes away (``… | head``): 128 + SIGPIPE, what a
#: shell reports for a Unix tool stopped the same way.
EXIT_BROKEN_PIPE = 141
#: Exit status after Ctrl-C: 128 + SIGINT, as a shell reports it.
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render docs/CLI.md's usage blocks)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description=(
            "Move LoRA adapters from one base model to another without data or training "
            "(LoRA-X, arXiv 2501.16559; ProLoRA, arXiv 2506.04244)."
        ),
        epilog=f"Exit status: 0 on success; {EXIT_PARTIAL} when something was written but some layers or files were "
        "not transferred (transfer, migrate); 2 on bad input or when nothing could be transferred (one line on "
        f"stderr says what and how to fix it); {EXIT_INTERRUPTED} when interrupted (Ctrl-C).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {TOOL_VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "transfer",
        help="transfer a LoRA from a source base model to a target base model",
        description="Transfer a LoRA trained on SOURCE so that it works on TARGET, layer by layer, "
        "keeping only layers whose weight subspaces are similar enough.",
    )
    t.add_argument("--source", required=True, type=Path, help="base model the LoRA was trained on (.safetensors)")
    t.add_argument("--target", required=True, type=Path, help="base model to move the LoRA to (.safetensors)")
    t.add_argument("--lora", required=True, type=Path, help="the LoRA (kohya, ComfyUI, PEFT/diffusers or LoRA-X)")
    t.add_argument("--out", required=True, type=Path, help="output LoRA file (.safetensors)")
    _transfer_options(t)
    t.add_argument("--report", type=Path, default=None, help="write the per-layer report as JSON here")
    _common(t, comfyui=True, cache=True)

    m = sub.add_parser(
        "migrate",
        help="transfer every LoRA of a folder (recursively) to a new base model; resumable, one summary",
        description="Transfer every LoRA under LORA_DIR from SOURCE to TARGET, writing each to the same relative "
        "path under OUT_DIR (in its own key style, with its .report.json beside it), and summary.json + "
        "summary.md in OUT_DIR. The base pair is read and decomposed once. A file that cannot be transferred "
        "(another family, an adapter type that cannot be transferred, damaged, a pickle, a name clash) is one row of the summary; the run goes "
        "on. Re-running the same command keeps outputs newer than their input (resume).",
    )
    m.add_argument("--source", required=True, type=Path, help="base model the LoRAs were trained on (.safetensors)")
    m.add_argument("--target", required=True, type=Path, help="base model to move the LoRAs to (.safetensors)")
    m.add_argument("--lora-dir", required=True, type=Path, help="the folder of LoRAs (walked recursively)")
    m.add_argument("--out-dir", required=True, type=Path, help="where the transferred LoRAs and the summary go")
    m.add_argument(
        "--pattern", default="*", help="only files whose name matches this glob, e.g. '*style*' (default: all)"
    )
    _transfer_options(m)
    _common(m, comfyui=False, cache=True)

    s = sub.add_parser(
        "similarity",
        help="print per-layer subspace similarity (Φ_left, Φ_right, chance, verdict) of two base models",
        description="Compare the top-R singular subspaces of matching weights in two base models. "
        "With --lora, only the layers the LoRA patches; without, every 2-D/4-D weight both models have.",
    )
    s.add_argument("--source", required=True, type=Path, help="first base model (.safetensors)")
    s.add_argument("--target", required=True, type=Path, help="second base model (.safetensors)")
    s.add_argument("--lora", type=Path, default=None, help="only compare the layers this LoRA patches")
    s.add_argument("--rank", type=int, default=320, help="subspace rank R (default: %(default)s)")
    s.add_argument("--threshold", type=float, default=0.5, help="c of the threshold rule (default: %(default)s)")
    s.add_argument("--json", type=Path, default=None, dest="json_out", help="also write the table as JSON here")
    _common(s, comfyui=True, cache=True)

    i = sub.add_parser(
        "inspect",
        help="say what a LoRA or model file is (format, family guess, layers, ranks, metadata)",
        description="Describe a .safetensors LoRA or model file; only the header is read for models.",
    )
    i.add_argument("file", type=Path, help="a LoRA or model .safetensors file")
    i.add_argument("--json", action="store_true", dest="as_json", help="print JSON instead of text")

    c = sub.add_parser(
        "cache",
        help="show or empty the on-disk subspace cache",
        description="The subspace cache keeps the singular-value decompositions of base weights between runs. "
        "'info' prints its folder, entry count and size; 'clear' deletes its entries (only files it wrote).",
    )
    c.add_argument("action", choices=("info", "clear"), help="info: entries and size; clear: delete every entry")
    c.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="subspace cache folder (default: ~/.cache/lorax; the ComfyUI nodes use "
        "<ComfyUI user folder>/__lorax/subspace-cache)",
    )
    return parser


def _transfer_options(t: argparse.ArgumentParser) -> None:
    """The transfer options ``transfer`` and ``migrate`` share."""
    t.add_argument("--method", choices=METHODS, default="auto", help="transfer method (default: %(default)s)")
    t.add_argument(
        "--rank", type=int, default=320, help="subspace rank R per layer (default: %(default)s, as the paper)"
    )
    t.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="c in τ = chance + c·(1 − chance): how far above chance Φ must be (default: %(default)s)",
    )
    t.add_argument("--output-rank", type=int, default=None, help="re-compress every output layer to this rank")
    t.add_argument(
        "--match", choices=("auto", "name", "similarity"), default="auto", help="layer pairing (default: %(default)s)"
    )
    t.add_argument("--force", action="store_true", help="transfer layers below the threshold too (still reported)")
    t.add_argument("--strict", action="store_true", help="fail instead of skipping any layer")
    t.add_argument(
        "--style",
        choices=("source", "comfy"),
        default="source",
        help="output key style: the source file's (default) or ComfyUI-native diffusion_model.* names",
    )


def _options(args: argparse.Namespace) -> TransferOptions:
    """The core's options from the shared transfer flags."""
    return TransferOptions(
        method=args.method,
        rank=args.rank,
        threshold=args.threshold,
        force=args.force,
        output_rank=args.output_rank,
        match=args.match,
        strict=args.strict,
        device=args.device,
    )


def _common(p: argparse.ArgumentParser, *, comfyui: bool, cache: bool) -> None:
    p.add_argument("--device", default="cpu", help="where the linear algebra runs: cpu, cuda, cuda:1 … (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if comfyui:
        p.add_argument(
            "--comfyui",
            type=Path,
            default=None,
            metavar="PATH",
            help="a ComfyUI install whose key maps resolve diffusers-style layer names (reads only the model header)",
        )
    if cache:
        p.add_argument("--cache-dir", type=Path, default=None, help="subspace cache folder (default: ~/.cache/lorax)")
        p.add_argument("--no-cache", action="store_true", help="do not read or write the subspace cache")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 3 partial, 2 bad input or nothing done,
    130 interrupted, 141 output pipe closed)."""
    parser = build_parser()
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "transfer": _cmd_transfer,
        "migrate": _cmd_migrate,
        "similarity": _cmd_similarity,
        "inspect": _cmd_inspect,
        "cache": _cmd_cache,
    }
    try:
        args = parser.parse_args(argv)
        try:
            status = commands[args.command](args)
        except LoraxError as exc:
            message = " ".join(str(exc).split())
            # The core names the option; the command line names its flag.
            if isinstance(exc, OutputExistsError):
                message = message.replace(OutputExistsError.FIX, "pass --overwrite")
            elif isinstance(exc, CacheError):
                message = message.replace(CacheError.FIX, "pass --no-cache")
            print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
            status = 2
        except KeyboardInterrupt:
            # Outputs are published atomically: nothing half-written is left, and a cache entry
            # is either complete or absent.
            print(f"{PROG} {args.command}: interrupted; finished files are kept, nothing half-written is left "
                  "(re-run the same command to resume).", file=sys.stderr)  # fmt: skip
            status = EXIT_INTERRUPTED
        # Flush here, not at interpreter exit, so that a closed pipe is caught below.
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE


def _discard_stdout() -> None:
    """Point stdout at the null device: the reader is gone, and the final flush must not fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (e.g. captured output in tests)
        pass


# ---------------------------------------------------------------- transfer


def _cmd_transfer(args: argparse.Namespace) -> int:
    check_device(args.device, option="--device")
    check_output_path(args.out, overwrite=args.overwrite)
    if args.report is not None:
        _check_text_output(args.report, args.overwrite)
        if same_path(args.report, args.out):
            raise OptionError(
                f"--report {args.report} is the same file as --out; give the JSON report its own name, "
                f"e.g. {Path(args.out).with_suffix('.report.json')}."
            )
    for out_option, out_path in (("--out", args.out), ("--report", args.report)):
        for in_option in ("--source", "--target", "--lora"):
            if out_path is not None and same_path(out_path, getattr(args, in_option[2:])):
                raise OptionError(
                    f"{out_option} {out_path} is the {in_option} file; writing it would destroy an input. "
                    "Choose another output name."
                )
    options = _options(args)
    source, target = open_model(args.source), open_model(args.target)
    key_map, convert = _comfyui_key_map(args.comfyui, args.source, args.lora) if args.comfyui else (None, None)
    lora = read_lora(args.lora, key_transform=convert)
    with _progress("transfer", args.quiet) as progress:
        job = run_transfer(
            lora,
            source,
            target,
            options,
            lora_name=Path(args.lora).name,
            source_info=file_model_info(source),
            target_info=file_model_info(target),
            host="command line",
            key_map=key_map,
            source_name=str(source.path),
            style=args.style,
            cache=_cache(args),
            progress=progress,
        )
    result = job.result
    # The LoRA and its report are written together: both or neither.
    write_lora(
        args.out,
        job.out_layers,
        style="comfy" if args.style == "comfy" else lora,
        metadata=job.metadata,
        overwrite=args.overwrite,
        extra_files={args.report: result.report.to_json()} if args.report is not None else None,
    )
    print(result.report.summary())
    if job.bases_note:
        print(job.bases_note)
    print(f"wrote {args.out}" + (f" and {args.report}" if args.report is not None else ""))
    totals = result.report.totals()
    if totals["skipped"]:
        # stdout may be a pipe into a log; a partial transfer must also reach the terminal.
        print(f"lorax transfer: WARNING: {totals['skipped']} of {totals['layers']} layers were not transferred "
              "(reasons above and in the report); pass --strict to make this an error.", file=sys.stderr)  # fmt: skip
    return transfer_status(result.report)


# ---------------------------------------------------------------- migrate


def _cmd_migrate(args: argparse.Namespace) -> int:
    """Transfer a folder of LoRAs; one line per file on stdout, an overall bar on stderr, one summary."""
    from tqdm import tqdm

    from .cache import DEFAULT_MEMORY_BYTES, MemoryCache

    check_device(args.device, option="--device")
    for in_option in ("--source", "--target"):
        path = getattr(args, in_option[2:])
        if Path(args.out_dir).resolve() in Path(path).resolve().parents:
            raise OptionError(
                f"--out-dir {args.out_dir} holds the {in_option} file; choose an output folder of its own."
            )
    options = _options(args)
    source, target = open_model(args.source), open_model(args.target)
    # Without the disk cache the pair is still decomposed once per run: in memory, up to a bound.
    cache = MemoryCache(4 * DEFAULT_MEMORY_BYTES) if args.no_cache else _cache(args)
    width = [0]

    def on_row(index: int, total: int, row: LibraryRow) -> None:
        width[0] = width[0] or len(str(total))
        # tqdm.write keeps the bar (stderr, on a terminal) below the lines instead of tearing it.
        line = row.line().replace(OutputExistsError.FIX, "pass --overwrite")
        tqdm.write(f"[{index + 1:>{width[0]}}/{total}] {line}", file=sys.stdout)

    with _progress("migrate", args.quiet, unit="file") as bar:
        summary = migrate_library(
            args.lora_dir,
            args.out_dir,
            source,
            target,
            options,
            source_info=file_model_info(source),
            target_info=file_model_info(target),
            host="command line",
            pattern=args.pattern,
            style=args.style,
            cache=cache,
            overwrite=args.overwrite,
            strict=args.strict,
            progress=lambda i, n, d, t: bar(i, n) if t == 0 else None,
            on_row=on_row,
        )
    print(f"{summary.headline()}.")
    print(f"summary: {Path(args.out_dir) / SUMMARY_MD} and {SUMMARY_JSON}")
    status = summary.exit_status()
    if status != 0:
        print(f"lorax migrate: WARNING: {summary.headline()}; the problems are listed first in "
              f"{Path(args.out_dir) / SUMMARY_MD}.", file=sys.stderr)  # fmt: skip
    return status


# ---------------------------------------------------------------- similarity


def _cmd_similarity(args: argparse.Namespace) -> int:
    from .similarity import compute_similarity

    check_device(args.device, option="--device")
    if args.json_out is not None:
        _check_text_output(args.json_out, args.overwrite)
    source, target = open_model(args.source), open_model(args.target)
    if args.lora is not None:
        key_map, convert = _comfyui_key_map(args.comfyui, args.source, args.lora) if args.comfyui else (None, None)
        lora = read_lora(args.lora, key_transform=convert)
        plan = plan_transfer(lora, source, key_map, source_name=str(source.path))
        target.add_slices(plan.layers)
        names, keys = plan.names, list(plan.layers)
    else:
        names = {}
        keys = [k for k in source.keys() if len(source.shape(k)) in (2, 4)]
    pairs = [(k, k) for k in keys if k in target]
    if not pairs:
        raise FormatError(
            f"{args.source} and {args.target} share no 2-D/4-D weight names to compare; are they the same model family?"
        )
    with _progress("similarity", args.quiet) as progress:
        table = compute_similarity(
            source,
            target,
            pairs,
            rank=args.rank,
            threshold=args.threshold,
            cache=_cache(args),
            device=args.device,
            progress=progress,
        )
    rows = [("layer", "Φ_left", "Φ_right", "chance", "threshold", "verdict")]
    for e in table.entries:
        verdict = "pass" if e.passed else ("below" if e.phi is not None else f"not compared: {e.reason}")
        rows.append(
            (names.get(e.source_key, e.source_key), _fmt(e.phi_left), _fmt(e.phi_right), _fmt(e.chance),
             _fmt(e.threshold), verdict)
        )  # fmt: skip
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    for r in rows:
        print(
            "  ".join(cell.ljust(widths[c]) if c == 0 else cell.rjust(widths[c]) for c, cell in enumerate(r[:5])), r[5]
        )
    print(f"{sum(e.passed for e in table.entries)} of {len(table.entries)} layers pass.")
    if args.json_out is not None:
        write_text(args.json_out, json.dumps(json_safe(table.to_dict()), indent=2, allow_nan=False),
                   overwrite=args.overwrite)  # fmt: skip
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# ---------------------------------------------------------------- inspect


def _cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_file(args.file)
    if args.as_json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:" + ("" if value else " (none)"))
            for k, v in value.items():
                print(f"  {k}: {_short(str(v))}")
        else:
            print(f"{key}: {value}")
    return 0


def inspect_file(path: Path) -> dict[str, object]:
    """A JSON-able description of a LoRA or model file (what ``inspect`` prints)."""
    keys, shapes, metadata = read_keys(path)
    family = guess_family(shapes, metadata)
    if looks_like_lora(keys):
        lora = read_lora(path)
        # A LyCORIS layer's factors are its exact update (rank r1·r2 for LoHa, a Kronecker rank for
        # LoKr, flattened to 2-D): its own tensors say what the file holds, so it is counted by type.
        plain = {n: f for n, f in lora.layers.items() if not (isinstance(f, LycorisLayer) and f.kind != "lora")}
        types = Counter(_adapter_type(f) for f in lora.layers.values())
        ranks = Counter(layer.rank for layer in plain.values())
        convs = sum(1 for layer in lora.layers.values() if _is_conv(layer))
        alphas = Counter(
            "none" if getattr(layer, "alpha", None) is None else f"{layer.alpha:g}" for layer in plain.values()
        )  # type: ignore[union-attr]
        return {
            "file": str(path),
            "kind": "LoRA",
            "format": lora.format,
            "family": family,
            "layers": len(lora.layers),
            "adapter types": dict(sorted(types.items())),
            "conv layers": convs,
            "ranks": {str(r): n for r, n in sorted(ranks.items())},
            "alphas": dict(sorted(alphas.items())),
            "not transferable": {reason: n for reason, n in Counter(lora.unsupported.values()).most_common()},
            "metadata": dict(sorted(metadata.items())),
        }
    weights = SafetensorsWeights(path)
    params = sum(math.prod(s) for s in shapes.values())
    encoders = sorted({k.split(".")[1] for k in weights.keys() if k.startswith("text_encoders.")})
    return {
        "file": str(path),
        "kind": "model (full checkpoint)" if weights.is_checkpoint else "model (diffusion model only)",
        "family": family,
        "tensors": len(keys),
        "parameters": params,
        "diffusion model weights": sum(1 for k in weights.keys() if k.startswith("diffusion_model.")),
        "text encoders": ", ".join(encoders) or "none",
        "fingerprint": weights.fingerprint,
        "metadata": dict(sorted(metadata.items())),
    }


def _adapter_type(layer: object) -> str:
    """``lora``, ``lorax``, ``loha``, ``lokr`` or ``full``, with ``+dora`` for a DoRA magnitude."""
    if isinstance(layer, LycorisLayer):
        return layer.kind + ("+dora" if layer.dora_scale is not None else "")
    return "lora" if isinstance(layer, LoraFactors) else "lorax"


def _is_conv(layer: object) -> bool:
    """Whether a layer patches a conv weight: its file tensors (LyCORIS) or its down factor say so."""
    if isinstance(layer, LycorisLayer) and (layer.parts or layer.dora_scale is not None):
        tensors = [*layer.parts.values(), *([layer.dora_scale] if layer.dora_scale is not None else [])]
        return any(t.ndim == 4 for t in tensors)
    return isinstance(layer, LoraFactors) and layer.kernel is not None


def _short(text: str, limit: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------- cache


def _cmd_cache(args: argparse.Namespace) -> int:
    """``cache info`` / ``cache clear``: one line on stdout. A missing folder is reported, not created."""
    from .cache import default_cache_dir

    root = Path(args.cache_dir) if args.cache_dir is not None else default_cache_dir()
    if root.exists() and not root.is_dir():
        raise OptionError(
            f"--cache-dir {str(root)!r} is a file, not a folder; pass the cache folder "
            f"(default {str(default_cache_dir())!r})."
        )
    if not root.exists():
        print(f"subspace cache {root}: no entries (the folder does not exist yet)")
        return 0
    entries, size, cache = cache_usage(root)
    if args.action == "info":
        limit = _human_bytes(cache.max_bytes)
        print(f"subspace cache {root}: {_entries_text(entries)}, {_human_bytes(size)} (limit {limit})")
        return 0
    cache.clear()
    left, _, _ = cache_usage(root)
    print(f"subspace cache {root}: removed {_entries_text(entries - left)} ({_human_bytes(size)})")
    return 0


def cache_usage(root: Path) -> tuple[int, int, DiskCache]:
    """``(entry count, total bytes, the DiskCache)`` of the cache rooted at an existing folder ``root``.

    Raises:
        CacheError: the folder is not writable (the message names it).
    """
    from .cache import DiskCache

    cache = DiskCache(root)
    # Entries are the published ``*.safetensors`` files; in-flight temporary files end in ``.tmp``.
    entries = sum(1 for p in cache.directory.glob("*.safetensors") if p.is_file())
    return entries, cache.total_bytes(), cache


def _entries_text(n: int) -> str:
    return f"{n} entry" if n == 1 else f"{n} entries"


def _human_bytes(n: int) -> str:
    """``1536`` → ``1.5 KiB`` (binary units, one decimal; plain bytes below 1 KiB)."""
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


# ---------------------------------------------------------------- helpers


#: Seconds between progress lines when stderr is not a terminal (a log file, a CI job, ``2>&1 | tee``).
LOG_PROGRESS_INTERVAL_S = 10.0


class _LogLines:
    """A file-like stderr wrapper that turns tqdm's carriage-return redraws into whole lines.

    tqdm redraws its bar in place with ``\\r``; in a log that is one ever-growing line that
    appears only at the end. Each redraw here becomes its own ``\\n``-terminated line.
    """

    def __init__(self, stream: object) -> None:
        self._stream = stream
        self._last = ""

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line and line != self._last:  # the final update and close() draw the same line
            self._stream.write(f"{PROG}: {line}\n")  # type: ignore[attr-defined]
            self._last = line
        return len(text)

    def flush(self) -> None:
        self._stream.flush()  # type: ignore[attr-defined]


@contextmanager
def _progress(desc: str, quiet: bool, unit: str = "layer") -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback driving a tqdm bar on stderr.

    On a terminal the bar redraws in place. Anywhere else (stderr piped to a log) tqdm writes a
    plain line at most every :data:`LOG_PROGRESS_INTERVAL_S` seconds, plus the final count, so
    that a long run shows it is alive. ``--quiet`` silences both.
    """
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    bar = tqdm(
        total=0,
        desc=desc,
        unit=unit,
        disable=quiet,
        leave=not tty,  # on a terminal the finished bar is erased; in a log the last line stays
        file=sys.stderr if tty else _LogLines(sys.stderr),
        mininterval=0.1 if tty else LOG_PROGRESS_INTERVAL_S,
        bar_format=None
        if tty
        else "{desc}: {n_fmt}/{total_fmt} {unit}s ({percentage:.0f}%), {elapsed} elapsed, {remaining} left",
        delay=0 if tty else LOG_PROGRESS_INTERVAL_S,  # a short run prints nothing, as before
    )

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)  # update() (not refresh) honours mininterval

    try:
        yield update
    finally:
        bar.close()


def _cache(args: argparse.Namespace) -> object:
    from .cache import open_cache

    return open_cache(args.cache_dir, enabled=not args.no_cache)


def _check_text_output(path: Path, overwrite: bool) -> None:
    """Check a text output (report, JSON table) before any work, as ``--out`` is checked."""
    try:
        check_output_path(path, overwrite=overwrite, suffix=None)
    except OutputExistsError:
        raise OutputExistsError(f"{path}: the file already exists; choose another name or pass --overwrite.") from None


#: The host-side program that calls ComfyUI's key tables for ``--comfyui``. It lives with the
#: other ComfyUI glue in ``nodes/`` and runs as its own process (JSON on its standard output), so
#: the ``lorax_core`` process never imports ComfyUI or the pack's ``nodes`` package.
COMFY_BRIDGE = Path(__file__).resolve().parent.parent / "nodes" / "_comfy_keymap.py"
#: How long the bridge may take: importing ComfyUI and building a model on the meta device.
COMFY_BRIDGE_TIMEOUT_S = 600

LoraConverter = Callable[[dict[str, "torch.Tensor"]], dict[str, "torch.Tensor"]]


def _comfyui_key_map(
    root: Path, model_path: Path, lora_path: Path | None = None
) -> tuple[KeyMap, LoraConverter | None]:
    """ComfyUI's LoRA key map for the source model, and its renaming of the LoRA (``--comfyui``).

    The per-family tables that map diffusers block names onto the original UNet layout are
    ComfyUI's (GPL), so they are called, not copied — by ``nodes/_comfy_keymap.py``, run as a
    separate program with this Python. No weight is loaded: ComfyUI detects the model family
    from the file's header and builds the model and, for a full checkpoint, its text encoder on
    the ``meta`` device. Text-encoder targets are in the ``text_encoders.`` namespace of
    :mod:`lorax_core.modelio`.

    Returns:
        ``(key map, converter)``: the converter applies ComfyUI's ``convert_lora`` renames to the
        LoRA's state dict, or is ``None`` when ComfyUI keeps this LoRA's names (or no
        ``lora_path`` was given).

    Raises:
        OptionError: PATH is not a ComfyUI install, this Python cannot import ComfyUI (its
            dependencies are missing), or the pack's bridge program is missing or failed.
        FormatError: a file is unreadable, or ComfyUI does not recognise the model.
    """
    import subprocess

    root = root.expanduser().resolve()
    if not (root / "comfy" / "lora.py").is_file():
        raise OptionError(
            f"--comfyui {root}: not a ComfyUI install (no comfy/lora.py there); pass ComfyUI's root folder."
        )
    if not COMFY_BRIDGE.is_file():
        raise OptionError(
            f"--comfyui needs the pack's nodes/_comfy_keymap.py next to lorax_core (not found at {COMFY_BRIDGE}); "
            "run the command from a full checkout of the pack."
        )
    command = [sys.executable, str(COMFY_BRIDGE), "--comfyui", str(root), "--model", str(model_path)]
    if lora_path is not None:
        command += ["--lora", str(lora_path)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMFY_BRIDGE_TIMEOUT_S, check=False)
        lines = done.stdout.strip().splitlines()
        answer = json.loads(lines[-1]) if lines else None
        failure = (
            ""
            if isinstance(answer, dict)
            else f"exit status {done.returncode}: {_short(done.stderr.strip()[-400:], 400)}"
        )
    except subprocess.TimeoutExpired:
        answer, failure = None, f"no answer within {COMFY_BRIDGE_TIMEOUT_S} s"
    except (OSError, ValueError) as exc:
        answer, failure = None, f"{type(exc).__name__}: {exc}"
    if not isinstance(answer, dict):
        raise OptionError(
            f"--comfyui {root}: the pack's ComfyUI bridge ({COMFY_BRIDGE}) gave no answer ({failure}); "
            "check that this Python can run ComfyUI, or leave out --comfyui."
        )
    error = answer.get("error")
    if isinstance(error, dict):
        raise _bridge_error(root, model_path, str(error.get("kind")), str(error.get("message", "")))
    key_map: KeyMap = {str(name): _decode_target(target) for name, target in answer["key_map"].items()}
    return key_map, _renamer(answer.get("renames"), answer.get("extra") or {})


def _decode_target(target: object) -> str | tuple[object, ...]:
    """A key-map entry from the bridge's JSON (``nodes/_comfy_keymap.encode_target``), as ComfyUI holds it.

    ``[key, [dim, offset, size]]`` becomes ``(key, (dim, offset, size))``; a converted weight
    ``[key, slice or null, "function name"]`` keeps the function's name in third place, which
    :func:`lorax_core.formats.resolve.resolve_layers` reports per layer.
    """
    if not isinstance(target, list):
        return str(target)
    key, piece, *functions = target
    return (str(key), None if piece is None else tuple(piece), *functions)


def _bridge_error(root: Path, model_path: Path, kind: str, message: str) -> LoraxError:
    """The error for an answer ``{"error": {"kind", "message"}}`` of ``nodes/_comfy_keymap.py``."""
    if kind == "import":
        return OptionError(
            f"--comfyui {root}: this Python ({sys.executable}) cannot import ComfyUI ({message}); "
            "run the command with the Python that runs ComfyUI (its virtual environment, or the portable build's "
            "python_embeded), or install ComfyUI's requirements.txt into this Python."
        )
    if kind == "unrecognised":
        return FormatError(
            f"--comfyui: ComfyUI does not recognise {model_path} as a model it can load (no model family "
            "matches its weight names and shapes); pass the base model file the LoRA was trained on, as a "
            "checkpoint, a diffusion-model .safetensors, or a diffusers UNet (diffusion_pytorch_model.safetensors)."
        )
    if kind == "format":
        return FormatError(message)
    return FormatError(
        f"--comfyui: ComfyUI could not build a key map for {model_path} ({message}); "
        "pass the base model file the LoRA was trained on."
    )


def _renamer(renames: object, extra: dict[str, dict[str, object]]) -> LoraConverter | None:
    """A state-dict converter from the bridge's ``renames``/``extra`` (``None`` when names are kept)."""
    if not isinstance(renames, dict):
        return None
    import torch

    made = {
        name: torch.tensor(spec["values"], dtype=getattr(torch, str(spec["dtype"]))) for name, spec in extra.items()
    }

    def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**{new: state[old] for new, old in renames.items() if old in state}, **made}

    return convert
