"""Move a whole folder of LoRAs to a new base model in one run (the folder migration).

One base pair, many LoRAs: the two models are opened once and every LoRA goes through the one
transfer entry point (:func:`lorax_core.pipeline.run_transfer`) with one subspace cache, so each
base weight is read and decomposed once (LoRA-X, arXiv 2501.16559 §3: the subspaces depend on
the base weights only, never on the adapter) and every LoRA after the first reuses them.

Every file ends as one :class:`LibraryRow` — transferred, partial (some layers skipped) or
failed with a reason code — and the batch goes on (unless ``strict``). Outputs are written
atomically beside their JSON report (both or neither), so an interrupted run leaves no
half-written file, and a re-run skips every output that exists and is newer than its input
(*resume*). :class:`LibrarySummary` is the whole run: ``summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .errors import (
    FormatError,
    IncompatibleBaseError,
    LayerSkippedError,
    LoraxError,
    NonFiniteError,
    NothingTransferableError,
    OptionError,
    OutputExistsError,
    ShapeMismatchError,
    UnsafeFileError,
)
from .formats import LoraFile, read_keys, read_lora, write_lora
from .formats.family import guess_family
from .formats.io import PICKLE_SUFFIXES, write_text
from .pipeline import ModelInfo, run_transfer
from .types import TransferOptions, TransferReport, WeightSource, json_safe

if TYPE_CHECKING:
    from .cache import SubspaceCache
    from .formats.resolve import KeyMap
    from .linalg import Subspace

__all__ = [
    "EXIT_NOTHING",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "LibraryRow",
    "LibrarySummary",
    "find_loras",
    "migrate_library",
    "transfer_status",
]

#: Exit status: every LoRA (every layer of it) transferred, or was already up to date.
EXIT_OK = 0
#: Exit status: nothing could run — bad options or input, or no LoRA of the folder transferred.
EXIT_NOTHING = 2
#: Exit status: something was written, but some LoRA failed or some layers were skipped.
EXIT_PARTIAL = 3

#: Files the walk looks at: LoRAs, and pickles (never loaded; each gets a row saying why).
MODEL_SUFFIXES: tuple[str, ...] = (".safetensors", *PICKLE_SUFFIXES)
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
REPORT_SUFFIX = ".report.json"

Outcome = Literal["transferred", "partial", "failed"]


@dataclass
class LibraryRow:
    """One LoRA file of the folder and what became of it.

    Attributes:
        file: path relative to the LoRA folder (``/``-separated).
        outcome: ``transferred`` (every layer), ``partial`` (some layers skipped) or ``failed``.
        reason: a stable code for a problem (``""`` when transferred): ``partial``,
            ``other_family``, ``not_transferable``, ``pickle``, ``unreadable``, ``non_finite``,
            ``incompatible_base``, ``name_clash``, ``strict``, ``option``.
        detail: the sentence a person reads (the core's error message for a failure).
        family: the LoRA's guessed base family from its header (``""`` when unknown).
        layers, transferred: layer counts (``None`` when the file never got that far).
        skipped: ``{skip reason code: layers}``.
        mean_phi: mean over transferred layers of ``min(Φ_left, Φ_right)``.
        methods: ``{transfer method: layers}``.
        output: the written LoRA, relative to the output folder (``""`` when none).
        resumed: the output already existed and was newer than its input, so it was kept.
        seconds: wall time spent on this file.
    """

    file: str
    outcome: Outcome
    reason: str = ""
    detail: str = ""
    family: str = ""
    layers: int | None = None
    transferred: int | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    mean_phi: float | None = None
    methods: dict[str, int] = field(default_factory=dict)
    output: str = ""
    resumed: bool = False
    seconds: float = 0.0

    @property
    def problem(self) -> bool:
        return self.outcome != "transferred"

    def line(self) -> str:
        """One line for a log: ``a/b.safetensors: 12/12 layers, mean Φ 0.93 → a/b.safetensors``."""
        if self.outcome == "failed":
            return f"{self.file}: FAILED ({self.reason}) {self.detail}"
        counts = f"{self.transferred}/{self.layers} layers" if self.layers is not None else "layers unknown"
        phi = "" if self.mean_phi is None else f", mean Φ {self.mean_phi:.3f}"
        skipped = f", skipped: {_counts_text(self.skipped)}" if self.skipped else ""
        state = "up to date (kept)" if self.resumed else f"{self.seconds:.1f} s"
        return f"{self.file}: {counts}{phi}{skipped} → {self.output} [{state}]"


@dataclass
class LibrarySummary:
    """The whole folder run: one row per model file, plus what the walk ignored."""

    lora_dir: str
    out_dir: str
    source: str
    target: str
    rows: list[LibraryRow] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0

    def exit_status(self) -> int:
        """:data:`EXIT_OK`, :data:`EXIT_PARTIAL` or :data:`EXIT_NOTHING` (see the module docstring)."""
        if not self.rows or all(r.outcome == "failed" for r in self.rows):
            return EXIT_NOTHING
        return EXIT_PARTIAL if self.interrupted or any(r.problem for r in self.rows) else EXIT_OK

    def sorted_rows(self) -> list[LibraryRow]:
        """Problems first (failed, then partial), then by file."""
        rank = {"failed": 0, "partial": 1, "transferred": 2}
        return sorted(self.rows, key=lambda r: (rank[r.outcome], r.file))

    def counts(self) -> dict[str, int]:
        c = Counter(r.outcome for r in self.rows)
        return {
            "files": len(self.rows),
            "transferred": c["transferred"],
            "partial": c["partial"],
            "failed": c["failed"],
            "up_to_date": sum(r.resumed for r in self.rows),
            "ignored": len(self.ignored),
        }

    def headline(self) -> str:
        c = self.counts()
        text = (
            f"{c['files']} LoRA file{'' if c['files'] == 1 else 's'}: {c['transferred']} transferred, {c['partial']} partial, {c['failed']} failed"
            f" ({c['up_to_date']} already up to date)"
        )
        if self.ignored:
            text += f"; {c['ignored']} other files ignored"
        return text + ("; INTERRUPTED before the end" if self.interrupted else "")

    def to_dict(self) -> dict[str, object]:
        return {
            "lora_dir": self.lora_dir,
            "out_dir": self.out_dir,
            "source": self.source,
            "target": self.target,
            "counts": self.counts(),
            "exit_status": self.exit_status(),
            "interrupted": self.interrupted,
            "seconds": self.seconds,
            "rows": [asdict(r) for r in self.sorted_rows()],
            "ignored": list(self.ignored),
        }

    def to_markdown(self) -> str:
        """A table a person reads at a glance, problems first."""
        lines = [
            f"# LoRA folder migration: {self.source} → {self.target}",
            "",
            f"{self.headline()}.",
            "",
            "| file | outcome | family | layers | skipped | mean Φ | methods | output |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.sorted_rows():
            outcome = r.outcome + (f" ({r.reason})" if r.reason and r.reason != "partial" else "")
            outcome += " · kept" if r.resumed else ""
            layers = "" if r.layers is None else f"{r.transferred}/{r.layers}"
            skipped = _counts_text(r.skipped) if r.skipped else (_md(r.detail) if r.outcome == "failed" else "")
            phi = "" if r.mean_phi is None else f"{r.mean_phi:.3f}"
            cells = (_md(r.file), outcome, r.family, layers, skipped, phi, _counts_text(r.methods), _md(r.output))
            lines.append("| " + " | ".join(cells) + " |")
        if self.ignored:
            lines += ["", f"Ignored (not model files): {', '.join(_md(p) for p in self.ignored)}"]
        return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def transfer_status(report: TransferReport) -> int:
    """A single transfer's exit status: :data:`EXIT_OK`, or :data:`EXIT_PARTIAL` when a layer was skipped."""
    return EXIT_PARTIAL if report.skipped else EXIT_OK


def find_loras(root: Path, pattern: str = "*", exclude: Sequence[Path] = ()) -> tuple[list[Path], list[Path]]:
    """The model files under ``root`` (recursive, sorted) whose name matches ``pattern``, and the other files.

    Model files end in :data:`MODEL_SUFFIXES` (pickles included, so that each gets a row);
    anything else (preview images, notes) is returned second, for the summary. Folders in
    ``exclude`` (the output folder when it lies inside ``root``) and hidden entries (``.…``,
    such as the writer's temporary files) are not walked.
    """
    skip = {os.path.normcase(os.path.realpath(p)) for p in exclude}
    found: list[Path] = []
    other: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and os.path.normcase(os.path.realpath(Path(folder, d))) not in skip
        )
        for name in sorted(files):
            path = Path(folder, name)
            if name.startswith(".") or not path.match(pattern):
                continue
            (found if path.suffix.lower() in MODEL_SUFFIXES else other).append(path)
    return found, other


def _reason(error: LoraxError) -> str:
    """The row's reason code for a file-level error (most specific class first)."""
    for cls, code in (
        (UnsafeFileError, "pickle"),
        (ShapeMismatchError, "other_family"),
        (NothingTransferableError, "not_transferable"),
        (IncompatibleBaseError, "incompatible_base"),
        (NonFiniteError, "non_finite"),
        (LayerSkippedError, "strict"),
        (OptionError, "option"),
        (FormatError, "unreadable"),
    ):
        if isinstance(error, cls):
            return code
    return "error"


def _fill_stats(row: LibraryRow, report: dict[str, object]) -> None:
    """Layer counts, skip reasons, mean Φ and method mix of a report dict (fresh or read back from disk)."""
    layers = report.get("layers") or []
    done = [r for r in layers if r.get("status") == "transferred"]  # type: ignore[union-attr]
    row.layers, row.transferred = len(layers), len(done)  # type: ignore[arg-type]
    row.skipped = dict(Counter(str(r.get("code") or "skipped") for r in layers if r not in done))  # type: ignore[union-attr]
    row.methods = dict(Counter(str(r.get("method")) for r in done))
    phis = [min(v for v in (r.get("phi_left"), r.get("phi_right")) if v is not None) for r in done
            if r.get("phi_left") is not None or r.get("phi_right") is not None]  # fmt: skip
    row.mean_phi = sum(phis) / len(phis) if phis else None
    row.outcome = "partial" if row.skipped else "transferred"
    row.reason = "partial" if row.skipped else ""


class _StoredSubspaces:
    """A cache wrapper that answers a miss with the stored (storage-rounded) entry, as a hit would.

    A :class:`~lorax_core.cache.DiskCache` miss returns the exact decomposition and later hits the
    float16-rounded one; in a folder run that would make a LoRA's output depend on whether an
    earlier file had touched the same layer. Returning what was stored makes every file's
    result independent of the order of the files.
    """

    def __init__(self, inner: SubspaceCache) -> None:
        self._inner = inner

    def get_or_compute(
        self, fingerprint: str, key: str, rank: int, compute: Callable[[], Subspace], *, method: str | None = None
    ) -> Subspace:
        more = {} if method is None else {"method": method}
        sub = self._inner.get_or_compute(fingerprint, key, rank, compute, **more)
        lookup = getattr(self._inner, "lookup", None)
        stored = lookup(fingerprint, key, rank, **more) if lookup is not None else None
        return sub if stored is None else stored.to(sub.U.device)

    def __getattr__(self, name: str) -> object:
        # lookup/contains/put/flush/clear of the wrapped cache (the batched path's writable cache).
        return getattr(self._inner, name)


def migrate_library(
    lora_dir: Path,
    out_dir: Path,
    source: WeightSource,
    target: WeightSource,
    options: TransferOptions,
    *,
    source_info: ModelInfo,
    target_info: ModelInfo,
    host: str,
    pattern: str = "*",
    exclude: Sequence[Path] = (),
    key_map: KeyMap | None = None,
    host_rule: Callable[[str, str | None], str] | None = None,
    style: Literal["source", "comfy"] = "source",
    cache: SubspaceCache | None = None,
    overwrite: bool = False,
    strict: bool = False,
    progress: Callable[[int, int, int, int], None] | None = None,
    on_row: Callable[[int, int, LibraryRow], None] | None = None,
) -> LibrarySummary:
    """Transfer every LoRA under ``lora_dir`` into ``out_dir`` (same relative path and name), then write the summary.

    Each file goes through :func:`~lorax_core.pipeline.run_transfer` with the shared ``cache``
    (wrapped so a file's result does not depend on the files before it). Its output is written
    in its own key style (or ``comfy``) with its ``.report.json`` beside it, both or neither.

    Args:
        lora_dir, out_dir: the folders (``out_dir`` is created; when inside ``lora_dir`` it is not walked).
        source, target: the base pair, opened once by the caller.
        options: transfer options for every file (``options.strict`` is set from ``strict``).
        source_info, target_info, host: provenance (:func:`~lorax_core.pipeline.output_metadata`).
        pattern: a glob every file name (or ``**``-style relative path) must match.
        exclude: more folders not to walk.
        key_map, host_rule, style: see :func:`~lorax_core.pipeline.run_transfer`.
        overwrite: replace outputs that exist and are not newer than their input.
        strict: stop at the first problem (a failed file, or any skipped layer): its error is raised.
        progress: ``progress(file index, file count, layers done, layers total)``, per layer and
            once per file; a host's callback may raise to cancel (the file in progress writes nothing).
        on_row: ``on_row(file index, file count, row)`` after each file.

    Returns:
        The :class:`LibrarySummary` (also written as ``summary.json`` and ``summary.md`` in
        ``out_dir``, even when the run stops early; those two are replaced on every run).

    Raises:
        OptionError: the folders are unusable, the output folder is the LoRA folder, or no model file matches.
        LoraxError: with ``strict``, the first problem.
    """
    lora_dir, out_dir = Path(lora_dir), Path(out_dir)
    if not lora_dir.is_dir():
        raise OptionError(
            f"LoRA folder {lora_dir} does not exist or is not a folder; pass the folder holding your LoRAs."
        )
    if os.path.normcase(os.path.realpath(lora_dir)) == os.path.normcase(os.path.realpath(out_dir)):
        raise OptionError(
            f"the output folder {out_dir} is the LoRA folder; each output would replace its input. Choose another folder."
        )
    files, other = find_loras(lora_dir, pattern, [out_dir, *exclude])
    if not files:
        raise OptionError(
            f"no LoRA file under {lora_dir} matches {pattern!r} (looked for {', '.join(MODEL_SUFFIXES)}); "
            "check the folder and the pattern."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    options = TransferOptions(**{**asdict(options), "strict": strict})
    shared = _StoredSubspaces(cache) if cache is not None else None
    summary = LibrarySummary(
        lora_dir=str(lora_dir), out_dir=str(out_dir), source=source_info.name, target=target_info.name,
        ignored=[p.relative_to(lora_dir).as_posix() for p in other],
    )  # fmt: skip
    job = _FileJob(out_dir=out_dir, source=source, target=target, options=options, source_info=source_info,
                   target_info=target_info, host=host, key_map=key_map, host_rule=host_rule, style=style,
                   cache=shared, overwrite=overwrite)  # fmt: skip
    start = time.perf_counter()
    total = len(files)
    finished = False
    try:
        for index, path in enumerate(files):
            rel = path.relative_to(lora_dir)
            row = _migrate_one(path, rel, job,
                               None if progress is None else (lambda d, t, i=index: progress(i, total, d, t)))
            summary.rows.append(row)
            if progress is not None:
                progress(index + 1, total, 0, 0)
            if on_row is not None:
                on_row(index, total, row)
            if strict and row.problem:
                raise _strict_error(row)
        finished = True
    finally:
        summary.interrupted = not finished
        summary.seconds = time.perf_counter() - start
        write_summary(summary, out_dir)
    return summary


def _strict_error(row: LibraryRow) -> LoraxError:
    """The error that stops a strict run at ``row`` (the core's message, and where the run stopped)."""
    return LoraxError(f"strict: stopped at {row.file} ({row.reason}; files before it are written): {row.detail}")


def write_summary(summary: LibrarySummary, out_dir: Path) -> None:
    """``summary.json`` and ``summary.md`` in ``out_dir`` (atomic; replaced on every run)."""
    write_text(out_dir / SUMMARY_JSON, json.dumps(json_safe(summary.to_dict()), indent=2, allow_nan=False),
               overwrite=True)  # fmt: skip
    write_text(out_dir / SUMMARY_MD, summary.to_markdown(), overwrite=True)


@dataclass(frozen=True)
class _FileJob:
    """What every file of one folder run shares: :func:`migrate_library`'s settings, passed once."""

    out_dir: Path
    source: WeightSource
    target: WeightSource
    options: TransferOptions
    source_info: ModelInfo
    target_info: ModelInfo
    host: str
    key_map: KeyMap | None
    host_rule: Callable[[str, str | None], str] | None
    style: Literal["source", "comfy"]
    cache: SubspaceCache | None
    overwrite: bool


def _migrate_one(path: Path, rel: Path, job: _FileJob, progress: Callable[[int, int], None] | None) -> LibraryRow:
    """One file of the folder → one row; a file-level :class:`LoraxError` or ``OSError`` becomes the row's reason."""
    start = time.perf_counter()
    row = LibraryRow(file=rel.as_posix(), outcome="failed")
    out_dir, overwrite, style = job.out_dir, job.overwrite, job.style
    out = (out_dir / rel).with_suffix(".safetensors")
    report_path = out.with_suffix(REPORT_SUFFIX)
    try:
        _, shapes, metadata = read_keys(path) if path.suffix.lower() == ".safetensors" else ((), {}, {})
        row.family = guess_family(shapes, metadata) if shapes else ""
        if out.exists():
            if out.stat().st_mtime >= path.stat().st_mtime and not overwrite:
                return _resumed(row, out, report_path, out_dir)
            if not overwrite:
                row.reason = "name_clash"
                row.detail = (
                    f"{out} already exists and is older than its input (another file of that name, or the input "
                    f"changed since); move it away or {OutputExistsError.FIX}."
                )
                return row
        lora: LoraFile = read_lora(path)
        done = run_transfer(
            lora, job.source, job.target, job.options, lora_name=rel.as_posix(), source_info=job.source_info,
            target_info=job.target_info, host=job.host, key_map=job.key_map, source_name=job.source_info.name,
            host_rule=job.host_rule, style=style, cache=job.cache, progress=progress,
        )  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        report = done.result.report
        write_lora(
            out, done.out_layers, style="comfy" if style == "comfy" else lora, metadata=done.metadata,
            overwrite=overwrite, extra_files={report_path: report.to_json()},
        )  # fmt: skip
        _fill_stats(row, json_safe(report.to_dict()))  # type: ignore[arg-type]
        row.output = out.relative_to(out_dir).as_posix()
    except LoraxError as error:
        row.reason, row.detail = _reason(error), " ".join(str(error).split())
    except OSError as error:  # a file that vanished, a full disk, a folder we may not write
        row.reason, row.detail = "unreadable", f"{path}: {error.strerror or error}"
    finally:
        row.seconds = time.perf_counter() - start
    return row


def _resumed(row: LibraryRow, out: Path, report_path: Path, out_dir: Path) -> LibraryRow:
    """The row of an output kept from an earlier run (its stats from the report beside it, when readable)."""
    row.resumed, row.output = True, out.relative_to(out_dir).as_posix()
    try:
        _fill_stats(row, json.loads(report_path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        row.outcome, row.detail = "transferred", f"kept; its report {report_path.name} is missing or unreadable"
    return row
