"""The benchmark pipeline: build the world, transfer every adapter with every method, score.

Stages (each logged with its wall time):

1. metric classifier; base models ``source`` → ``finetuned`` (further trained on a half
   shifted, half base mix), ``heavy`` (trained several times longer on the shifted domain
   alone: large drift), ``reparam`` (``source`` with permuted hidden units, a function-preserving
   change of basis, then briefly fine-tuned), ``shallow`` (fewer transformer blocks, distilled
   from ``source``), ``unrelated`` (same architecture, another seed); trained models are cached
   under ``OUT/cache`` for the run only (keyed by a hash of the configuration) so an
   interrupted run resumes;
2. style adapters on ``source`` (LoRA rank 8 and 16, LoRA-X with R = ``lorax_rank``, a LoHa and a
   LoKr made as LyCORIS makes them and read by the core's LyCORIS reader) and the same adapters
   retrained on every target in :data:`RETRAIN_ON` (same data, steps and seed);
3. on every target, one cell per (style, adapter) with samples for ``none``, ``copy``,
   ``project``, ``prolora``, ``exact``, ``lorax`` (LoRA-X adapters), ``auto`` and
   ``retrained`` (LoHa/LoKr: ``none``, ``copy``, ``auto``, ``retrained``); on :data:`EXTRAS_ON`
   also the rank sweep and the candidate per-layer ``auto`` rules built from the per-method
   results (``rules.py``);
4. scores (style, content, look, distance), per-layer similarity statistics and sample grids.

A cell is a :class:`CellScorer`: one call to :meth:`CellScorer.add` samples and scores any
further method that produces adapter layers (``dict[model key, LoraFactors]``, or ``None``
when it refuses), see :func:`_evaluate_cell`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from lorax_core.errors import NothingTransferableError
from lorax_core.linalg import top_subspace
from lorax_core.lycoris import LycorisLayer
from lorax_core.refine import RefineOptions
from lorax_core.transfer import lorax_to_lora, transfer_adapter
from lorax_core.types import DictWeights, LoraFactors, LoraXFactors, TransferOptions, TransferResult, json_default

from . import data, rules
from .distill import DistillConfig, add_refined
from .evaluate import Sampler, classifier_accuracy, feature_bandwidth, merge, score
from .model import Diffusion, ModelConfig, TextEncoder, ToyLDM, permute_internal_bases
from .report import seed_run, write_grids
from .train import (
    LYCORIS_KINDS,
    Classifier,
    distill,
    init_from,
    lycoris_layer,
    train_adapter,
    train_classifier,
    train_diffusion,
)

__all__ = ["BenchConfig", "CellScorer", "build_adapters", "build_heavy", "build_reparam", "run"]

log = logging.getLogger("benchmarks.quality")

TARGETS: tuple[str, ...] = ("finetuned", "heavy", "reparam", "shallow", "unrelated")
#: Targets on which adapters are retrained (the reference); on ``unrelated`` transfer is expected
#: to be refused, so its retrained reference would only cost time.
RETRAIN_ON: tuple[str, ...] = ("finetuned", "heavy", "reparam", "shallow")
#: Targets that also get the rank sweep and the candidate ``rule:*`` rows; the newer targets
#: leave them out to keep a full run near 20 minutes on one thread.
EXTRAS_ON: tuple[str, ...] = ("finetuned", "shallow")
#: The domain whose look each base model has, scored by ``look``. ``finetuned`` was trained on a
#: half/half mix and its samples are a mix of both looks; ``shifted`` is what it adds to
#: ``source``, so its ``look`` is the share of that new look, to be read against its own ``none`` row.
TARGET_DOMAIN: dict[str, str] = {
    "source": "base",
    "finetuned": "shifted",
    "heavy": "shifted",
    "reparam": "base",
    "shallow": "base",
    "unrelated": "base",
}
#: Targets on which the first LoRA adapter is also refined without data (lorax_core.refine),
#: starting from ``auto``'s transfer; ``unrelated`` is refused by ``auto``, so there is nothing to
#: start from (a user would have to force the transfer first).
REFINE_ON: tuple[str, ...] = ("finetuned", "heavy", "reparam", "shallow")
#: Training-free methods every cell scores: stock loading, the core's rule, and LoRA-X's own
#: method on LoRA-X adapters. ``--all-methods`` adds every other method (:data:`ALL_LORA_METHODS`),
#: the rank sweep and the candidate rules, at about twice the run time.
#: Targets on which every adapter kind is refined (elsewhere in :data:`REFINE_ON`: the first LoRA adapter).
REFINE_EVERY_ADAPTER_ON: tuple[str, ...] = ("finetuned", "heavy")
#: Targets whose first LoRA adapter also gets the comparison refinements (``refine_variants``).
VARIANTS_ON: tuple[str, ...] = ("finetuned", "heavy")
LORA_METHODS: tuple[str, ...] = ("copy", "auto")
LORAX_METHODS: tuple[str, ...] = ("copy", "lorax", "auto")
ALL_LORA_METHODS: tuple[str, ...] = ("copy", "project", "prolora", "exact", "auto")
ALL_LORAX_METHODS: tuple[str, ...] = ("copy", "project", "prolora", "exact", "lorax", "auto")


#: Bumped when the code that builds the world (models, adapters, classifier) changes, so a stale cache is not reused.
WORLD_VERSION = 4


@dataclass(frozen=True)
class BenchConfig:
    """Every knob of a run; stored in ``quality.json`` so a result says how it was made."""

    quick: bool = False
    threads: int = 1
    #: worker processes evaluating targets in parallel (1 = in this process)
    jobs: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    shallow_depths: tuple[int, int, int, int, int] = (1, 1, 1, 1, 1)
    #: ``source`` from scratch: rounds of ``base_round`` steps (warm restarts). Its samples' class
    #: accuracy in a tuning run: 0.80 after 1000 steps (squares drawn as circles), 0.88 after 1500,
    #: 0.97 after 2000, 1.00 after 2500
    base_steps: int = 2500
    base_round: int = 500
    unrelated_steps: int = 250
    #: ``finetuned``: the mixed data learns the new look fast and the shapes in it slowly; class
    #: accuracy in a tuning run: 0.61 after 360 steps at 5e-4, 0.83 after 1000 at 5e-4, 0.90 after 1000 at 1e-3
    finetune_steps: int = 1500
    finetune_lr: float = 1e-3
    #: ``heavy``: shifted data only at 2× the rate of ``finetuned`` (tuning run: 0.90 after 500 steps, 0.98 after 1000)
    heavy_steps: int = 1000
    heavy_lr: float = 2e-3
    #: ``reparam``: steps on the base domain after the permutation, at ``reparam_lr`` (at
    #: ``finetune_lr`` the restart shook the source's content from 0.94 to 0.84 class accuracy)
    reparam_steps: int = 40
    reparam_lr: float = 1e-4
    distill_steps: int = 150
    batch: int = 64
    base_lr: float = 2e-3
    adapter_steps: int = 60
    adapter_batch: int = 32
    lora_lr: float = 5e-3
    lorax_lr: float = 3e-2
    lora_ranks: tuple[int, ...] = (8, 16)
    lorax_rank: int = 16
    #: LoHa rank r and LoKr second-block rank dim (why these: :func:`_adapters`)
    loha_rank: int = 4
    lokr_dim: int = 2
    #: LoHa/LoKr rates (Adam, the LoRAs' steps and schedule): from a check at several rates, where their
    #: style on ``source`` was level with the rank-8 LoRA's within the check's interval (QUALITY.md, "Adapters")
    loha_lr: float = 2e-2
    lokr_lr: float = 3e-2
    transfer_rank: int = 16
    #: extra transfer ranks R tried with ``project`` and ``exact`` on the first LoRA adapter
    #: (R = 32 covers every 32-wide layer completely, so there the projection is the identity)
    rank_sweep: tuple[int, ...] = (8, 32)
    threshold: float = 0.5
    styles: tuple[str, ...] = ("palette", "stripes")
    #: 800 steps left the content head at 0.63–0.86 clean accuracy; 3000 reach 1.0 on every domain × style
    classifier_steps: int = 3000
    #: evaluation images per method: ``seeds`` × ``per_seed``. The standard error of a rate p over n
    #: images is √(p(1−p)/n): 640 images keep it ≤ 0.0198 for every p (512 left it at 0.022 near
    #: p = 0.5), and sampling 640 images takes ~12 s on one core, so the refinements, not the
    #: samples, set the run time
    seeds: int = 20
    per_seed: int = 32
    ddim_steps: int = 10
    #: classifier-free guidance of the evaluation samples and of the refinement's generations
    #: (3 rather than 2: the bare source then draws its prompt's shape ≥ 0.9 of the time)
    guidance: float = 3.0
    seed: int = 0
    #: the targets to build and evaluate (a subset of :data:`TARGETS`, in that order)
    targets: tuple[str, ...] = TARGETS
    #: every training-free method, the rank sweep and the candidate rules (``--all-methods``)
    all_methods: bool = False
    #: data-free refinement at the core's defaults (``refine:default``) on every adapter of every
    #: :data:`REFINE_ON` target, plus ``refine_variants`` on the first LoRA adapter (comparisons)
    refine_default: RefineOptions = field(default_factory=RefineOptions)
    #: the comparisons: without the content-keeping term, and with the probes centred on mid-noise
    #: (``timestep_bias`` 0) instead of the noisier timesteps
    refine_variants: tuple[tuple[str, RefineOptions], ...] = (("effect", RefineOptions(keep_guidance=0.0)),
                                                               ("centred", RefineOptions(timestep_bias=0.0)))
    #: further ``RefineOptions.seed`` values of ``refine:default`` on every adapter of the
    #: :data:`REFINE_EVERY_ADAPTER_ON` targets (rows ``refine:default@seed<N>``): one refinement
    #: can land 0.1–0.3× of the retrained style from the next on the same cell, far beyond the
    #: sampling interval of one run, so the targets are judged on the mean over seeds
    refine_seeds: tuple[int, ...] = (1, 2)
    refine: DistillConfig = field(default_factory=DistillConfig)

    @classmethod
    def quick_config(cls) -> BenchConfig:
        """The ``--quick`` smoke run: every stage and method, tiny budgets (minutes on 2 cores)."""
        return cls(
            quick=True, base_steps=30, unrelated_steps=20, finetune_steps=10, heavy_steps=10, reparam_steps=4,
            distill_steps=10, batch=16,
            adapter_steps=6, adapter_batch=8, classifier_steps=30, lora_ranks=(8,), styles=("palette",),
            rank_sweep=(32,), seeds=2, per_seed=4, ddim_steps=4, all_methods=True,
            refine_default=RefineOptions(steps=3, probes=16, batch=4),
            refine_variants=(("effect", RefineOptions(keep_guidance=0.0, steps=3, probes=16, batch=4)),
                             ("centred", RefineOptions(timestep_bias=0.0, steps=3, probes=16, batch=4)),
                             ("output", RefineOptions(objective="output", steps=3, probes=16, batch=4))),
            refine_seeds=(1,),
            refine=DistillConfig(generations=8, ddim_steps=4),
        )  # fmt: skip

    def fingerprint(self) -> str:
        """Hash of the settings the cached models and adapters depend on (evaluation and refinement are not cached)."""
        world = ("model", "shallow_depths", "base_steps", "base_round", "unrelated_steps", "finetune_steps",
                 "finetune_lr", "heavy_steps", "heavy_lr", "reparam_steps", "reparam_lr", "distill_steps", "batch",
                 "base_lr", "adapter_steps", "adapter_batch", "lora_lr", "lorax_lr", "lora_ranks", "lorax_rank",
                 "loha_rank", "lokr_dim", "loha_lr", "lokr_lr", "styles", "classifier_steps", "seed",
                 "quick")  # fmt: skip
        settings = {k: v for k, v in asdict(self).items() if k in world} | {"world_version": WORLD_VERSION}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _adapters(cfg: BenchConfig) -> list[tuple[str, str, int]]:
    """``(name, kind, rank)`` of the adapter kinds: ``lora_r8``, ``lora_r16``, ``lorax_R16``, ``loha_r4``, ``lokr``.

    The LyCORIS ranks give updates of a LoRA's rank (their layers: ``train.LohaLayer``,
    ``train.LokrLayer``): a rank-4 LoHa has ΔW rank ≤ 4² = 16, as ``lora_r16``; a LoKr with its
    second block of rank dim = 2 has ΔW rank ≤ min(a, c)·2 with ``(a, c)`` its first block (4×4 …
    16×8 here), i.e. 8 on the 32-wide and 16 on the 64-wide layers, between ``lora_r8`` and
    ``lora_r16`` — and dim = 2 is below half of every second block's sides, so LyCORIS too would
    factor ``lokr_w2`` rather than store it full.
    """
    kinds = [(f"lora_r{r}", "lora", r) for r in cfg.lora_ranks]
    return [*kinds, (f"lorax_R{cfg.lorax_rank}", "lorax", cfg.lorax_rank),
            (f"loha_r{cfg.loha_rank}", "loha", cfg.loha_rank), ("lokr", "lokr", cfg.lokr_dim)]  # fmt: skip


class _Stage:
    """Logs the wall time of a pipeline stage and keeps it for the report."""

    def __init__(self, timings: dict[str, float], name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()
        log.info("stage %s ...", self.name)

    def __exit__(self, *exc: object) -> None:
        self.timings[self.name] = round(time.perf_counter() - self.start, 1)
        log.info("stage %s done in %.1f s", self.name, self.timings[self.name])


def _cached(path: Path, build: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if path.exists():
        return torch.load(path, weights_only=True)
    state = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    torch.save(state, partial)
    partial.replace(path)  # atomic: a parallel run never reads half a file
    return state


def _plain(domain: str) -> Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    """Training data of a base model: unstyled images of one domain."""
    return lambda b, g: data.sample_batch(b, domain, "plain", g)


def _mixed(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Half shifted, half base: a fine-tune that adds a look without forgetting the base domain.

    As Realistic Vision still draws what SD 1.5 draws; shifted-only data at a higher rate wiped
    out the source's behaviour in a first run (see QUALITY.md) — that world is now ``heavy``.
    """
    shifted, base = (
        data.sample_batch(b // 2, "shifted", "plain", g),
        data.sample_batch(b - b // 2, "base", "plain", g),
    )
    return torch.cat([shifted[0], base[0]]), torch.cat([shifted[1], base[1]])


def _continued(
    cfg: BenchConfig,
    start: ToyLDM,
    text: TextEncoder,
    diffusion: Diffusion,
    batch_fn: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    seed: int,
) -> dict[str, torch.Tensor]:
    """``start``'s weights trained further on ``batch_fn`` (a fine-tune); ``start`` is left unchanged.

    Like ``source``, in cosine rounds of ``base_round`` steps with warm restarts (round r seeded ``seed + 10 r``).
    """
    m = ToyLDM(start.config, start.depths)
    m.load_state_dict(start.state_dict())
    for r, first in enumerate(range(0, steps, cfg.base_round)):
        train_diffusion(m, text, diffusion, batch_fn, steps=min(cfg.base_round, steps - first), batch=cfg.batch,
                        lr=lr, seed=seed + 10 * r)  # fmt: skip
    return m.state_dict()


def build_heavy(cfg: BenchConfig, source: ToyLDM, text: TextEncoder, diffusion: Diffusion) -> dict[str, torch.Tensor]:
    """``heavy``: ``source`` trained ``heavy_steps`` more on the shifted domain alone, at ``heavy_lr``.

    The "Pony from SDXL" case: a derivative trained long enough to replace the base look, so an
    adapter made on the source meets a base whose function has moved far.
    """
    return _continued(cfg, source, text, diffusion, _plain("shifted"), steps=cfg.heavy_steps, lr=cfg.heavy_lr,
                      seed=cfg.seed + 4)  # fmt: skip


def build_reparam(cfg: BenchConfig, source: ToyLDM, text: TextEncoder, diffusion: Diffusion) -> dict[str, torch.Tensor]:
    """``reparam``: ``source`` with permuted hidden units (same function), then ``reparam_steps`` on ``base``.

    The permutation (:func:`~benchmarks.quality.model.permute_internal_bases`) changes no output,
    so an adapter retrained here is as good as on ``source``; but every attention, feed-forward
    and ResBlock weight sees its rows or columns shuffled, so a copied update pushes on the wrong
    units. The short fine-tune on the source's own domain keeps the look and makes the weights
    more than an exact permutation, as two independently finished checkpoints would be.
    """
    permuted = permute_internal_bases(source, cfg.seed + 5)
    return _continued(cfg, permuted, text, diffusion, _plain("base"), steps=cfg.reparam_steps,
                      lr=cfg.reparam_lr, seed=cfg.seed + 6)  # fmt: skip


def _build_bases(cfg: BenchConfig, text: TextEncoder, diffusion: Diffusion, cache: Path) -> dict[str, ToyLDM]:
    def scratch(seed: int, steps: int) -> dict[str, torch.Tensor]:
        # Cosine rounds with warm restarts (SGDR, Loshchilov & Hutter, ICLR 2017) of base_round
        # steps: the prompt's shape is learnt late, and a restart lets a longer run keep learning it.
        torch.manual_seed(seed)
        m = ToyLDM(cfg.model)
        for r, start in enumerate(range(0, steps, cfg.base_round)):
            train_diffusion(m, text, diffusion, _plain("base"), steps=min(cfg.base_round, steps - start),
                            batch=cfg.batch, lr=cfg.base_lr, seed=seed + r)  # fmt: skip
        return m.state_dict()

    def shallow() -> dict[str, torch.Tensor]:
        m = ToyLDM(cfg.model, cfg.shallow_depths)
        init_from(m, source)
        distill(m, source, text, diffusion, _plain("base"), steps=cfg.distill_steps,
                batch=cfg.batch, lr=cfg.base_lr / 2, seed=cfg.seed + 2)  # fmt: skip
        return m.state_dict()

    source = ToyLDM(cfg.model)
    source.load_state_dict(_cached(cache / "source.pt", lambda: scratch(cfg.seed, cfg.base_steps)))
    builders: dict[str, tuple[tuple[int, ...], Callable[[], dict[str, torch.Tensor]]]] = {
        "finetuned": (cfg.model.depths, lambda: _continued(cfg, source, text, diffusion, _mixed,
                                                            steps=cfg.finetune_steps, lr=cfg.finetune_lr,
                                                            seed=cfg.seed + 1)),
        "heavy": (cfg.model.depths, lambda: build_heavy(cfg, source, text, diffusion)),
        "reparam": (cfg.model.depths, lambda: build_reparam(cfg, source, text, diffusion)),
        "shallow": (cfg.shallow_depths, shallow),
        "unrelated": (cfg.model.depths, lambda: scratch(cfg.seed + 100, cfg.unrelated_steps)),
    }  # fmt: skip
    models = {"source": source}
    for name in cfg.targets:
        depths, build = builders[name]
        models[name] = ToyLDM(cfg.model, depths)
        models[name].load_state_dict(_cached(cache / f"{name}.pt", build))
    for m in models.values():
        m.eval()
    return models


Layers = Mapping[str, LoraFactors] | Mapping[str, LoraXFactors]


def _adapter_state(layers: Layers) -> dict[str, torch.Tensor]:
    """An adapter as a flat tensor dict for the cache: ``key::part`` (LoHa/LoKr: its file tensors by suffix)."""
    out: dict[str, torch.Tensor] = {}
    for key, f in layers.items():
        if isinstance(f, LycorisLayer):
            out.update({f"{key}::{suffix}": tensor for suffix, tensor in f.parts.items()})
        elif isinstance(f, LoraXFactors):
            out[f"{key}::core"] = f.core
            out[f"{key}::shape"] = torch.tensor(f.shape)
        else:
            out[f"{key}::up"], out[f"{key}::down"] = f.up, f.down
            out[f"{key}::alpha"] = torch.tensor(f.alpha if f.alpha is not None else float("nan"))
    return out


def _adapter_layers(state: Mapping[str, torch.Tensor]) -> dict[str, LoraFactors] | dict[str, LoraXFactors]:
    """:func:`_adapter_state` read back; LoHa/LoKr layers through the core's reader (``build_lycoris``)."""
    keys = sorted({k.split("::")[0] for k in state})
    if any("::." in k for k in state):
        parts: dict[str, dict[str, torch.Tensor]] = {k: {} for k in keys}
        for name, tensor in state.items():
            key, suffix = name.split("::")
            parts[key][suffix] = tensor
        return {k: lycoris_layer(k, parts[k]) for k in keys}
    if any(f"{k}::core" in state for k in keys):
        return {k: LoraXFactors(core=state[f"{k}::core"], shape=tuple(state[f"{k}::shape"].tolist())) for k in keys}
    result: dict[str, LoraFactors] = {}
    for k in keys:
        alpha = float(state[f"{k}::alpha"])
        result[k] = LoraFactors(up=state[f"{k}::up"], down=state[f"{k}::down"], alpha=None if alpha != alpha else alpha)
    return result


def _on_base(layers: Layers, base: ToyLDM) -> dict[str, LoraFactors]:
    """An adapter as plain factors on the base it was trained on (LoRA-X: ``U core Vᵀ``; LoHa/LoKr as read)."""
    state = base.state_dict()
    out: dict[str, LoraFactors] = {}
    for key, f in layers.items():
        if isinstance(f, LoraXFactors):
            out[key] = lorax_to_lora(f, top_subspace(state[key], f.rank))
        else:
            out[key] = f
    return out


def _transfer(layers: Layers, source: ToyLDM, target: ToyLDM, method: str, cfg: BenchConfig) -> TransferResult | None:
    """``transfer_adapter`` with the benchmark's R and threshold; ``None`` when it refuses everything."""
    options = TransferOptions(method=method, rank=cfg.transfer_rank, threshold=cfg.threshold)  # type: ignore[arg-type]
    try:
        return transfer_adapter(layers, DictWeights(source.state_dict()), DictWeights(target.state_dict()), options)
    except NothingTransferableError:
        return None


@dataclass
class CellScorer:
    """Samples and scores every method of one (target, style, adapter) cell.

    The methods of a cell share prompts, seeds and the reference (the retrained adapter's
    samples, if any), so scoring one more method is one call: :meth:`add` for adapter layers,
    :meth:`add_transfer` for a ``transfer_adapter`` result. Scores land in :attr:`methods`
    (the cell's ``methods`` entry of ``quality.json``), samples in :attr:`images`.
    """

    sampler: Sampler
    classifier: Classifier
    target: ToyLDM
    state: dict[str, torch.Tensor]
    style_index: int
    domain_index: int
    bandwidth: float
    reference: torch.Tensor | None = None
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    methods: dict[str, dict[str, object]] = field(default_factory=dict)
    sampled: list[tuple[str, Mapping[str, LoraFactors]]] = field(default_factory=list)

    def add_images(
        self, method: str, images: torch.Tensor, info: Mapping[str, object] | None = None
    ) -> dict[str, object]:
        """Score samples made elsewhere (the target's shared ``none`` samples, the reference) as ``method``."""
        scores = score(self.classifier, images, self.sampler.labels(), self.style_index, self.domain_index,
                       self.sampler.seeds, self.reference, self.bandwidth)  # fmt: skip
        self.images[method] = images
        self.methods[method] = {**scores.summary(), **(info or {})}
        return self.methods[method]

    def add(
        self, method: str, layers: Mapping[str, LoraFactors] | None, info: Mapping[str, object] | None = None
    ) -> dict[str, object]:
        """Sample the target with ``layers`` (model key → factors) merged in and score them as ``method``.

        ``layers=None`` means the method refused the adapter: the bare target is what a user gets,
        and its samples are exactly the ``none`` row's (same weights, prompts and noise), so those
        are reused. ``info`` (default: the refused flag and the layer count) is stored with the scores.
        """
        if info is None:
            info = {"refused": layers is None, "layers_transferred": 0 if layers is None else len(layers)}
        if layers is None and "none" in self.images:
            return self.add_images(method, self.images["none"], info)
        if layers is not None:
            # the same layers sample the same images (same weights, prompts and noise): reuse them
            same = next((m for m, seen in self.sampled if _same_layers(seen, layers)), None)
            if same is not None:
                return self.add_images(method, self.images[same], {**info, "same_as": same})
            self.sampled.append((method, layers))
        images = self.sampler(self.target, self.state if layers is None else merge(self.state, layers))
        return self.add_images(method, images, info)

    def add_transfer(self, method: str, result: TransferResult | None) -> dict[str, object]:
        """:meth:`add` for a ``transfer_adapter`` result (``None``: refused), with its layer counts
        (and, for LoHa/LoKr layers, ``written_as``: how many were written in their own type or as a LoRA)."""
        if result is None:
            return self.add(method, None)
        totals = result.report.totals()
        info: dict[str, object] = {"refused": False, "layers_transferred": totals["transferred"],
                                   "layers_skipped": totals["skipped"]}  # fmt: skip
        written = Counter(r.written_as for r in result.report.transferred if r.written_as is not None)
        if written:  # LyCORIS layers: how many were written in their own type, how many as a LoRA
            info["written_as"] = dict(sorted(written.items()))
        return self.add(method, result.layers, info)


def _same_layers(a: Mapping[str, LoraFactors], b: Mapping[str, LoraFactors]) -> bool:
    """Whether two adapters have exactly the same layers and factors (so they sample the same images)."""
    return a.keys() == b.keys() and all(
        a[k].alpha == b[k].alpha and torch.equal(a[k].up, b[k].up) and torch.equal(a[k].down, b[k].down) for k in a
    )


@dataclass(frozen=True)
class _World:
    """What every cell needs: the configuration, base models, adapters and the metric machinery."""

    cfg: BenchConfig
    bases: dict[str, ToyLDM]
    adapters: dict[tuple[str, str, str], Layers]  # (base, style, adapter name) -> layers
    sampler: Sampler
    classifier: Classifier
    bandwidth: float


def _evaluate_cell(
    world: _World, target_name: str, style: str, name: str, kind: str, none_images: torch.Tensor
) -> tuple[CellScorer, dict[str, TransferResult | None]]:
    """Every method of one (target, style, adapter) cell; returns the scored cell and the transfers.

    LoHa/LoKr cells score ``none``, ``copy``, ``auto`` and ``retrained`` only (also with
    ``all_methods``) and are not refined: they test that the core's LyCORIS path transfers a
    user's file at least as well as loading it does. A further method (say, one that refines a
    transferred adapter) is one more ``cell.add(method_name, layers_or_None)`` here.
    """
    cfg = world.cfg
    source, target = world.bases["source"], world.bases[target_name]
    t_state = target.state_dict()
    layers = world.adapters[("source", style, name)]
    reference = None
    if target_name in RETRAIN_ON:
        own = _on_base(world.adapters[(target_name, style, name)], target)
        reference = world.sampler(target, merge(t_state, own))
    cell = CellScorer(world.sampler, world.classifier, target, t_state, data.STYLES.index(style),
                      data.DOMAINS.index(TARGET_DOMAIN[target_name]), world.bandwidth, reference)  # fmt: skip
    cell.add_images("none", none_images)
    if reference is not None:
        cell.add_images("retrained", reference)
    transfers: dict[str, TransferResult | None] = {}
    if kind in LYCORIS_KINDS:
        methods = LORA_METHODS
    elif cfg.all_methods:
        methods = ALL_LORAX_METHODS if kind == "lorax" else ALL_LORA_METHODS
    else:
        methods = LORAX_METHODS if kind == "lorax" else LORA_METHODS
    for method in methods:
        transfers[method] = _transfer(layers, source, target, method, cfg)
        cell.add_transfer(method, transfers[method])
    if cfg.all_methods and target_name in EXTRAS_ON:
        if name == _adapters(cfg)[0][0]:
            for R in cfg.rank_sweep:
                for method in ("project", "exact"):
                    swept = _transfer(layers, source, target, method, replace(cfg, transfer_rank=R))
                    cell.add_transfer(f"{method}@R{R}", swept)
        if kind == "lora":
            for rule_name, rule in rules.CANDIDATES.items():
                cell.add_transfer(rule_name, rules.compose(rule, transfers, layers))
    auto = transfers["auto"]
    first = name == _adapters(cfg)[0][0]
    refined = kind not in LYCORIS_KINDS and (first or target_name in REFINE_EVERY_ADAPTER_ON)
    if target_name in REFINE_ON and auto is not None and refined:
        runs = {"default": cfg.refine_default}
        if target_name in REFINE_EVERY_ADAPTER_ON:
            runs.update({seed_run("default", seed): replace(cfg.refine_default, seed=seed) for seed in cfg.refine_seeds})
        if name == _adapters(cfg)[0][0] and target_name in VARIANTS_ON:
            runs.update(cfg.refine_variants)
        add_refined(cell, source, _on_base(layers, source), target, auto.layers, "auto", world.sampler.text,
                    world.sampler.diffusion, runs, replace(cfg.refine, guidance=cfg.guidance))  # fmt: skip
    return cell, transfers


def _evaluate_target(
    world: _World, target_name: str, progress: Callable[[str], None] = log.info
) -> tuple[dict[str, object], dict[str, object] | None, dict[str, torch.Tensor]]:
    """Every cell of one target: its ``quality.json`` entry, similarity statistics and sample-grid rows."""
    cfg, bases, adapters = world.cfg, world.bases, world.adapters
    target = bases[target_name]
    none_imgs = world.sampler(target, target.state_dict())
    rows: dict[str, torch.Tensor] = {"none": none_imgs}
    similarity: dict[str, object] | None = None
    per_adapter: dict[str, object] = {}
    first = _adapters(cfg)[0][0]
    for style in cfg.styles:
        for name, kind, _ in _adapters(cfg):
            cell, transfers = _evaluate_cell(world, target_name, style, name, kind, none_imgs)
            per_adapter[f"{style}/{name}"] = {"style": style, "kind": kind, "methods": cell.methods}
            if name == first:
                for method, images in cell.images.items():
                    rows[f"{style}:{method}"] = images
                similarity = {
                    **rules.similarity_stats(transfers),
                    "weight_drift": _drift(bases["source"].state_dict(), target.state_dict(),
                                           adapters[("source", style, name)]),
                }  # fmt: skip
            progress(f"evaluated {style}/{name} on {target_name}")
    return {"domain": TARGET_DOMAIN[target_name], "adapters": per_adapter}, similarity, rows


def _target_job(
    job: tuple[BenchConfig, Path, str],
) -> tuple[dict[str, object], dict[str, object] | None, dict[str, torch.Tensor]]:
    """:func:`_evaluate_target` in a worker process, with the world read back from the cache."""
    cfg, cache, target_name = job
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(cfg.threads)
    cfg = replace(cfg, targets=(target_name,))
    text, diffusion = TextEncoder(cfg.model), Diffusion()
    classifier = Classifier()
    classifier.load_state_dict(torch.load(cache / "classifier.pt", weights_only=True))
    classifier.eval()
    bases = _build_bases(cfg, text, diffusion, cache)
    base_names = ("source", target_name) if target_name in RETRAIN_ON else ("source",)
    adapters = build_adapters(cfg, bases, text, diffusion, cache, base_names, lambda _: None)
    sampler = Sampler(text, diffusion, cfg.seeds, cfg.per_seed, cfg.ddim_steps, cfg.guidance)
    world = _World(cfg, bases, adapters, sampler, classifier, feature_bandwidth(classifier))
    return _evaluate_target(world, target_name)


def build_adapters(
    cfg: BenchConfig,
    bases: Mapping[str, ToyLDM],
    text: TextEncoder,
    diffusion: Diffusion,
    cache: Path,
    base_names: tuple[str, ...],
    progress: Callable[[str], None] = log.info,
    styles: tuple[str, ...] | None = None,
) -> dict[tuple[str, str, str], Layers]:
    """Every adapter kind and style trained on each of ``base_names`` (cached); ``(base, style, name)`` → layers.

    ``styles`` (default: all of ``cfg.styles``) picks some of them; each keeps the seed it has in the full set.
    """
    adapters: dict[tuple[str, str, str], Layers] = {}
    for base_name in base_names:
        for si, style in enumerate(cfg.styles):
            if styles is not None and style not in styles:
                continue
            for ai, (name, kind, rank) in enumerate(_adapters(cfg)):
                seed = cfg.seed + 10 + 10 * si + ai
                lr = {"lora": cfg.lora_lr, "lorax": cfg.lorax_lr, "loha": cfg.loha_lr, "lokr": cfg.lokr_lr}[kind]

                def build(b: str = base_name, k: str = kind, r: int = rank, s: str = style, sd: int = seed,
                          lr_: float = lr) -> dict[str, torch.Tensor]:  # fmt: skip
                    return _adapter_state(train_adapter(bases[b], k, r, text, diffusion, s, steps=cfg.adapter_steps,
                                                        batch=cfg.adapter_batch, lr=lr_, seed=sd))  # fmt: skip

                state = _cached(cache / f"adapter_{base_name}_{style}_{name}.pt", build)
                adapters[(base_name, style, name)] = _adapter_layers(state)
                progress(f"adapter {name} ({style}) on {base_name} ready")
    return adapters


def _classifier_state(cfg: BenchConfig, cache: Path) -> dict[str, torch.Tensor]:
    """The metric classifier's weights (cached); its initial weights come from ``torch.manual_seed(cfg.seed)``."""
    torch.manual_seed(cfg.seed)
    return _cached(cache / "classifier.pt",
                   lambda: train_classifier(cfg.classifier_steps, 64, cfg.seed + 3).state_dict())  # fmt: skip


def _world_job(job: tuple[BenchConfig, Path, str]) -> float:
    """Build one shared piece of the world into the cache in a worker process; returns its seconds.

    ``classifier`` needs nothing else; ``adapters:<style>`` (the source's adapters of one style)
    needs ``source.pt`` in the cache. Every piece is seeded by itself, so the cache holds the
    same tensors whichever process built it (``tests/quality/test_world_jobs.py``).
    """
    cfg, cache, what = job
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    if what == "classifier":
        _classifier_state(cfg, cache)
    else:
        style = what.removeprefix("adapters:")
        text, diffusion = TextEncoder(cfg.model), Diffusion()
        bases = _build_bases(replace(cfg, targets=()), text, diffusion, cache)
        build_adapters(cfg, bases, text, diffusion, cache, ("source",), lambda _: None, styles=(style,))
    return round(time.perf_counter() - started, 1)


def run(
    out: Path,
    cfg: BenchConfig,
    *,
    cache_root: Path,
    progress: Callable[[str], None] = log.info,
    on_update: Callable[[dict[str, object]], None] | None = None,
) -> dict[str, object]:
    """Run the whole benchmark into ``out``; returns the ``quality.json`` document (also written there).

    Trained models are cached in ``cache_root / cfg.fingerprint()`` so an interrupted run resumes.
    The document is written again whenever a target finishes (``complete: false`` and the
    ``pending`` targets until the last), and ``on_update(document)`` is called each time.
    """
    started = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    timings: dict[str, float] = {}
    cache = cache_root / cfg.fingerprint()
    text, diffusion = TextEncoder(cfg.model), Diffusion()
    # With worker processes, this process builds only what every target shares (the source and
    # its adapters); each worker builds its own target and the adapters retrained there, in parallel.
    # A cold run trains the classifier in a worker while this process trains the source (neither
    # needs the other), and splits the source's adapters by style.
    own_targets = cfg.targets if cfg.jobs == 1 else ()
    with ExitStack() as stack:
        pool: ProcessPoolExecutor | None = None
        if cfg.jobs > 1:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=cfg.jobs,
                                                           mp_context=multiprocessing.get_context("spawn")))  # fmt: skip
        clf_job = pool.submit(_world_job, (cfg, cache, "classifier")) if pool is not None else None
        if clf_job is None:
            with _Stage(timings, "classifier"):
                clf_state = _classifier_state(cfg, cache)
        with _Stage(timings, "base_models"):
            bases = _build_bases(replace(cfg, targets=own_targets), text, diffusion, cache)
        with _Stage(timings, "adapters"):
            if pool is not None:
                style_jobs = [pool.submit(_world_job, (cfg, cache, f"adapters:{s}")) for s in cfg.styles[1:]]
                build_adapters(cfg, bases, text, diffusion, cache, ("source",), progress, styles=cfg.styles[:1])
                for job in style_jobs:
                    job.result()
            adapters = build_adapters(cfg, bases, text, diffusion, cache, ("source", *(t for t in own_targets
                                                                                    if t in RETRAIN_ON)), progress)  # fmt: skip
        if clf_job is not None:
            timings["classifier"] = clf_job.result()  # trained (or read) alongside the stages above
            clf_state = _classifier_state(cfg, cache)
        classifier = Classifier()
        classifier.load_state_dict(clf_state)
        classifier.eval()
        bandwidth = feature_bandwidth(classifier)
        clean_accuracy = classifier_accuracy(classifier)
        log.info("classifier accuracy on clean renders: %s", clean_accuracy)
        sampler = Sampler(text, diffusion, cfg.seeds, cfg.per_seed, cfg.ddim_steps, cfg.guidance)
        world = _World(cfg, bases, adapters, sampler, classifier, bandwidth)
        return _evaluate(out, world, cache, pool, clean_accuracy, timings, started, progress, on_update)


def _evaluate(
    out: Path,
    world: _World,
    cache: Path,
    pool: ProcessPoolExecutor | None,
    clean_accuracy: dict[str, float],
    timings: dict[str, float],
    started: float,
    progress: Callable[[str], None],
    on_update: Callable[[dict[str, object]], None] | None,
) -> dict[str, object]:
    """:func:`run`'s evaluation stage: every target (in ``pool``'s workers when given) and the source reference."""
    cfg, bases, adapters, sampler = world.cfg, world.bases, world.adapters, world.sampler
    classifier, bandwidth = world.classifier, world.bandwidth
    labels = sampler.labels()
    results: dict[str, object] = {}
    similarity: dict[str, object] = {}
    grids: dict[str, dict[str, torch.Tensor]] = {}
    reference: dict[str, object] = {}

    with _Stage(timings, "evaluate"):
        pending: dict[Future, str] | None = None
        if pool is not None:
            # targets in worker processes (each reads the world from the cache built above) while
            # this process scores the adapters on their own base
            pending = {pool.submit(_target_job, (cfg, cache, t)): t for t in cfg.targets}
        src = bases["source"]
        src_state = src.state_dict()
        src_domain = data.DOMAINS.index(TARGET_DOMAIN["source"])
        none_src = sampler(src, src_state)
        grids.setdefault("source", {})["none"] = none_src
        for style in cfg.styles:
            si = data.STYLES.index(style)
            for name, _, _ in _adapters(cfg):
                own = sampler(src, merge(src_state, _on_base(adapters[("source", style, name)], src)))
                reference[f"{style}/{name}"] = {
                    "none": score(classifier, none_src, labels, si, src_domain, cfg.seeds, None, bandwidth).summary(),
                    "adapter": score(classifier, own, labels, si, src_domain, cfg.seeds, None, bandwidth).summary(),
                }
                if name == _adapters(cfg)[0][0]:
                    grids["source"][f"{style}"] = own
        def publish(complete: bool) -> dict[str, object]:
            document: dict[str, object] = {
                # every finished target, in TARGETS order; a run still going lists the rest as pending
                "targets": {t: results[t] for t in cfg.targets if t in results},
                "complete": complete,
                "pending": [t for t in cfg.targets if t not in results],
                "source_reference": reference,
                "similarity": {t: similarity[t] for t in cfg.targets if t in similarity},
                "domains": {name: TARGET_DOMAIN[name] for name in ("source", *cfg.targets)},
                "config": {**asdict(cfg), "fingerprint": cfg.fingerprint(), "torch": torch.__version__,
                           "bandwidth": bandwidth},
                "classifier_clean_accuracy": clean_accuracy,
                "timings": timings,
                "seconds": round(time.perf_counter() - started, 1),
            }
            out.mkdir(parents=True, exist_ok=True)
            (out / "quality.json").write_text(json.dumps(document, indent=1, default=json_default))
            write_grids(out, {t: grids[t] for t in ("source", *cfg.targets) if t in grids})
            if on_update is not None:
                on_update(document)
            return document

        if pending is None:
            for t in cfg.targets:
                outcome = _evaluate_target(world, t, progress)
                results[t], similarity_t, grids[t] = outcome
                if similarity_t is not None:
                    similarity[t] = similarity_t
                publish(False)
        else:
            for future in as_completed(pending):
                t = pending[future]
                results[t], similarity_t, grids[t] = future.result()
                if similarity_t is not None:
                    similarity[t] = similarity_t
                progress(f"target {t} done")
                publish(False)
    return publish(True)


def _drift(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], layers: Layers
) -> dict[str, float | int]:
    """Relative weight change ‖W_t − W_s‖/‖W_s‖ over the adapted layers the target has by name."""
    ratios = [
        float((target[k] - source[k]).norm() / source[k].norm())
        for k in layers
        if k in target and target[k].shape == source[k].shape
    ]
    if not ratios:
        return {"layers": 0}
    return {"layers": len(ratios), "mean": round(sum(ratios) / len(ratios), 4), "max": round(max(ratios), 4)}
