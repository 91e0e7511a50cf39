"""The benchmark pipeline: build the world, transfer every adapter with every method, score.

Stages (each logged with its wall time):

1. metric classifier; base models ``source`` → ``finetuned`` (further trained on the shifted
   domain), ``shallow`` (fewer transformer blocks, distilled from ``source``), ``unrelated``
   (same architecture, another seed); trained models are cached under ``OUT/cache`` for the
   run only (keyed by a hash of the configuration) so an interrupted run resumes;
2. style adapters on ``source`` (LoRA rank 8 and 16, LoRA-X with R = ``lorax_rank``) and the
   same adapters retrained on ``finetuned`` and ``shallow`` (same data, steps and seed);
3. on every target, samples for ``none``, ``copy``, ``project``, ``prolora``, ``exact``,
   ``lorax`` (LoRA-X adapters), ``auto`` and ``retrained``, plus candidate per-layer ``auto``
   rules built from the per-method results (``rules.py``);
4. scores, per-layer similarity statistics and sample grids.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from lorax_core.errors import NothingTransferableError
from lorax_core.linalg import top_subspace
from lorax_core.transfer import lorax_to_lora, transfer_adapter
from lorax_core.types import DictWeights, LoraFactors, LoraXFactors, TransferOptions, TransferResult, json_default

from . import data, rules
from .evaluate import Sampler, Scores, classifier_accuracy, feature_bandwidth, merge, score
from .model import Diffusion, ModelConfig, TextEncoder, ToyLDM
from .report import write_grids
from .train import Classifier, distill, init_from, train_adapter, train_classifier, train_diffusion

__all__ = ["BenchConfig", "run"]

log = logging.getLogger("benchmarks.quality")

TARGETS: tuple[str, ...] = ("finetuned", "shallow", "unrelated")
#: Targets on which adapters are retrained (the reference); on ``unrelated`` transfer is expected
#: to be refused, so its retrained reference would only cost time.
RETRAIN_ON: tuple[str, ...] = ("finetuned", "shallow")
LORA_METHODS: tuple[str, ...] = ("copy", "project", "prolora", "exact", "auto")
LORAX_METHODS: tuple[str, ...] = ("copy", "project", "prolora", "exact", "lorax", "auto")


@dataclass(frozen=True)
class BenchConfig:
    """Every knob of a run; stored in ``quality.json`` so a result says how it was made."""

    quick: bool = False
    threads: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    shallow_depths: tuple[int, int, int, int, int] = (1, 1, 1, 1, 1)
    base_steps: int = 500
    unrelated_steps: int = 250
    finetune_steps: int = 120
    finetune_lr: float = 5e-4
    distill_steps: int = 150
    batch: int = 64
    base_lr: float = 2e-3
    adapter_steps: int = 60
    adapter_batch: int = 32
    lora_lr: float = 5e-3
    lorax_lr: float = 3e-2
    lora_ranks: tuple[int, ...] = (8, 16)
    lorax_rank: int = 16
    transfer_rank: int = 16
    #: extra transfer ranks R tried with ``project`` and ``exact`` on the first LoRA adapter
    #: (R = 32 covers every 32-wide layer completely, so there the projection is the identity)
    rank_sweep: tuple[int, ...] = (8, 32)
    threshold: float = 0.5
    styles: tuple[str, ...] = ("palette", "stripes")
    classifier_steps: int = 800
    seeds: int = 5
    per_seed: int = 8
    ddim_steps: int = 10
    guidance: float = 2.0
    seed: int = 0

    @classmethod
    def quick_config(cls) -> BenchConfig:
        """The ``--quick`` smoke run: every stage and method, tiny budgets (minutes on 2 cores)."""
        return cls(
            quick=True, base_steps=30, unrelated_steps=20, finetune_steps=10, distill_steps=10, batch=16,
            adapter_steps=6, adapter_batch=8, classifier_steps=30, lora_ranks=(8,), styles=("palette",),
            rank_sweep=(32,), seeds=2, per_seed=4, ddim_steps=4,
        )  # fmt: skip

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _adapters(cfg: BenchConfig) -> list[tuple[str, str, int]]:
    """``(name, kind, rank)`` of the adapter kinds: ``lora_r8``, ``lora_r16``, ``lorax_R16``."""
    kinds = [(f"lora_r{r}", "lora", r) for r in cfg.lora_ranks]
    return [*kinds, (f"lorax_R{cfg.lorax_rank}", "lorax", cfg.lorax_rank)]


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
    torch.save(state, path)
    return state


def _build_bases(cfg: BenchConfig, text: TextEncoder, diffusion: Diffusion, cache: Path) -> dict[str, ToyLDM]:
    def base_batch(domain: str) -> Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
        return lambda b, g: data.sample_batch(b, domain, "plain", g)

    def scratch(seed: int, steps: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        m = ToyLDM(cfg.model)
        train_diffusion(m, text, diffusion, base_batch("base"), steps=steps, batch=cfg.batch, lr=cfg.base_lr,
                        seed=seed)  # fmt: skip
        return m.state_dict()

    models: dict[str, ToyLDM] = {}
    models["source"] = ToyLDM(cfg.model)
    models["source"].load_state_dict(_cached(cache / "source.pt", lambda: scratch(cfg.seed, cfg.base_steps)))

    def mixed(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        # half shifted, half base: a fine-tune that adds a look without forgetting the base
        # domain (as Realistic Vision still draws what SD 1.5 draws); shifted-only data at a
        # higher rate wiped out the source's behaviour in a first run (see QUALITY.md)
        shifted, base = (
            data.sample_batch(b // 2, "shifted", "plain", g),
            data.sample_batch(b - b // 2, "base", "plain", g),
        )
        return torch.cat([shifted[0], base[0]]), torch.cat([shifted[1], base[1]])

    def finetune() -> dict[str, torch.Tensor]:
        m = ToyLDM(cfg.model)
        m.load_state_dict(models["source"].state_dict())
        train_diffusion(m, text, diffusion, mixed, steps=cfg.finetune_steps, batch=cfg.batch,
                        lr=cfg.finetune_lr, seed=cfg.seed + 1)  # fmt: skip
        return m.state_dict()

    def shallow() -> dict[str, torch.Tensor]:
        m = ToyLDM(cfg.model, cfg.shallow_depths)
        init_from(m, models["source"])
        distill(m, models["source"], text, diffusion, base_batch("base"), steps=cfg.distill_steps,
                batch=cfg.batch, lr=cfg.base_lr / 2, seed=cfg.seed + 2)  # fmt: skip
        return m.state_dict()

    models["finetuned"] = ToyLDM(cfg.model)
    models["finetuned"].load_state_dict(_cached(cache / "finetuned.pt", finetune))
    models["shallow"] = ToyLDM(cfg.model, cfg.shallow_depths)
    models["shallow"].load_state_dict(_cached(cache / "shallow.pt", shallow))
    models["unrelated"] = ToyLDM(cfg.model)
    models["unrelated"].load_state_dict(
        _cached(cache / "unrelated.pt", lambda: scratch(cfg.seed + 100, cfg.unrelated_steps))
    )
    for m in models.values():
        m.eval()
    return models


Layers = Mapping[str, LoraFactors] | Mapping[str, LoraXFactors]


def _adapter_state(layers: Layers) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, f in layers.items():
        if isinstance(f, LoraXFactors):
            out[f"{key}::core"] = f.core
            out[f"{key}::shape"] = torch.tensor(f.shape)
        else:
            out[f"{key}::up"], out[f"{key}::down"] = f.up, f.down
            out[f"{key}::alpha"] = torch.tensor(f.alpha if f.alpha is not None else float("nan"))
    return out


def _adapter_layers(state: Mapping[str, torch.Tensor]) -> dict[str, LoraFactors] | dict[str, LoraXFactors]:
    keys = sorted({k.split("::")[0] for k in state})
    if any(f"{k}::core" in state for k in keys):
        return {k: LoraXFactors(core=state[f"{k}::core"], shape=tuple(state[f"{k}::shape"].tolist())) for k in keys}
    result: dict[str, LoraFactors] = {}
    for k in keys:
        alpha = float(state[f"{k}::alpha"])
        result[k] = LoraFactors(up=state[f"{k}::up"], down=state[f"{k}::down"], alpha=None if alpha != alpha else alpha)
    return result


def _on_base(layers: Layers, base: ToyLDM) -> dict[str, LoraFactors]:
    """An adapter as plain factors on the base it was trained on (LoRA-X: ``U core Vᵀ``)."""
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
class _Cell:
    images: torch.Tensor
    scores: Scores | None = None
    info: dict[str, object] = field(default_factory=dict)


def run(
    out: Path, cfg: BenchConfig, *, cache_root: Path, progress: Callable[[str], None] = log.info
) -> dict[str, object]:
    """Run the whole benchmark into ``out``; returns the ``quality.json`` document (also written there).

    Trained models are cached in ``cache_root / cfg.fingerprint()`` so an interrupted run resumes.
    """
    started = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    cache = cache_root / cfg.fingerprint()
    text, diffusion = TextEncoder(cfg.model), Diffusion()

    with _Stage(timings, "classifier"):
        clf_state = _cached(cache / "classifier.pt",
                            lambda: train_classifier(cfg.classifier_steps, 64, cfg.seed + 3).state_dict())  # fmt: skip
        classifier = Classifier()
        classifier.load_state_dict(clf_state)
        classifier.eval()
        bandwidth = feature_bandwidth(classifier)
        clean_accuracy = classifier_accuracy(classifier)
        log.info("classifier accuracy on clean renders: %s", clean_accuracy)
    with _Stage(timings, "base_models"):
        bases = _build_bases(cfg, text, diffusion, cache)

    adapters: dict[tuple[str, str, str], Layers] = {}  # (base, style, adapter name) -> layers
    with _Stage(timings, "adapters"):
        for base_name in ("source", *RETRAIN_ON):
            for si, style in enumerate(cfg.styles):
                for ai, (name, kind, rank) in enumerate(_adapters(cfg)):
                    seed = cfg.seed + 10 + 10 * si + ai
                    lr = cfg.lora_lr if kind == "lora" else cfg.lorax_lr

                    def build(
                        b: str = base_name,
                        k: str = kind,
                        r: int = rank,
                        s: str = style,
                        sd: int = seed,
                        lr_: float = lr,
                    ) -> dict[str, torch.Tensor]:
                        return _adapter_state(train_adapter(bases[b], k, r, text, diffusion, s, steps=cfg.adapter_steps,
                                                            batch=cfg.adapter_batch, lr=lr_, seed=sd))  # fmt: skip

                    state = _cached(cache / f"adapter_{base_name}_{style}_{name}.pt", build)
                    adapters[(base_name, style, name)] = _adapter_layers(state)
                    progress(f"adapter {name} ({style}) on {base_name} ready")

    sampler = Sampler(text, diffusion, cfg.seeds, cfg.per_seed, cfg.ddim_steps, cfg.guidance)
    labels = sampler.labels()
    results: dict[str, object] = {}
    similarity: dict[str, object] = {}
    grids: dict[str, dict[str, torch.Tensor]] = {}
    reference: dict[str, object] = {}

    with _Stage(timings, "evaluate"):
        src = bases["source"]
        src_state = src.state_dict()
        none_src = sampler(src, src_state)
        grids.setdefault("source", {})["none"] = none_src
        for style in cfg.styles:
            for name, _, _ in _adapters(cfg):
                own = sampler(src, merge(src_state, _on_base(adapters[("source", style, name)], src)))
                si = data.STYLES.index(style)
                reference[f"{style}/{name}"] = {
                    "none": score(classifier, none_src, labels, si, cfg.seeds, None, bandwidth).summary(),
                    "adapter": score(classifier, own, labels, si, cfg.seeds, None, bandwidth).summary(),
                }
                if name == _adapters(cfg)[0][0]:
                    grids["source"][f"{style}"] = own
        for target_name in TARGETS:
            target = bases[target_name]
            t_state = target.state_dict()
            none_imgs = sampler(target, t_state)
            grids.setdefault(target_name, {})["none"] = none_imgs
            per_adapter: dict[str, object] = {}
            for style in cfg.styles:
                si = data.STYLES.index(style)
                for name, kind, _ in _adapters(cfg):
                    layers = adapters[("source", style, name)]
                    cells: dict[str, _Cell] = {"none": _Cell(none_imgs)}
                    transfers: dict[str, TransferResult | None] = {}
                    if target_name in RETRAIN_ON:
                        own = _on_base(adapters[(target_name, style, name)], target)
                        cells["retrained"] = _Cell(sampler(target, merge(t_state, own)))
                    for method in LORAX_METHODS if kind == "lorax" else LORA_METHODS:
                        result = _transfer(layers, src, target, method, cfg)
                        transfers[method] = result
                        cells[method] = _cell(sampler, target, t_state, result)
                    if name == _adapters(cfg)[0][0] and target_name in RETRAIN_ON:
                        for R in cfg.rank_sweep:
                            for method in ("project", "exact"):
                                swept = _transfer(layers, src, target, method, replace(cfg, transfer_rank=R))
                                cells[f"{method}@R{R}"] = _cell(sampler, target, t_state, swept)
                    if kind == "lora" and target_name in RETRAIN_ON:
                        for rule_name, rule in rules.CANDIDATES.items():
                            chosen = rules.compose(rule, transfers, layers)
                            cells[rule_name] = _cell(sampler, target, t_state, chosen)
                    ref = cells["retrained"].images if "retrained" in cells else None
                    methods = {}
                    for method, cell in cells.items():
                        cell.scores = score(classifier, cell.images, labels, si, cfg.seeds, ref, bandwidth)
                        methods[method] = {**cell.scores.summary(), **cell.info}
                    per_adapter[f"{style}/{name}"] = {"style": style, "kind": kind, "methods": methods}
                    if name == _adapters(cfg)[0][0]:
                        for method, cell in cells.items():
                            grids[target_name][f"{style}:{method}"] = cell.images
                        similarity[target_name] = {
                            **rules.similarity_stats(transfers),
                            "weight_drift": _drift(src_state, t_state, layers),
                        }
                    progress(f"evaluated {style}/{name} on {target_name}")
            results[target_name] = {"adapters": per_adapter}

    seconds = round(time.perf_counter() - started, 1)
    document: dict[str, object] = {
        "targets": results,
        "source_reference": reference,
        "similarity": similarity,
        "config": {**asdict(cfg), "fingerprint": cfg.fingerprint(), "torch": torch.__version__, "bandwidth": bandwidth},
        "classifier_clean_accuracy": clean_accuracy,
        "timings": timings,
        "seconds": seconds,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(document, indent=1, default=json_default))
    write_grids(out, grids)
    return document


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


def _cell(sampler: Sampler, target: ToyLDM, t_state: dict[str, torch.Tensor], result: TransferResult | None) -> _Cell:
    """Samples with a transferred adapter; a refused transfer samples the bare target (what a user gets)."""
    if result is None:
        return _Cell(sampler(target, t_state), info={"refused": True, "layers_transferred": 0})
    totals = result.report.totals()
    return _Cell(
        sampler(target, merge(t_state, result.layers)),
        info={"refused": False, "layers_transferred": totals["transferred"], "layers_skipped": totals["skipped"]},
    )
