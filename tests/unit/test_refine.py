"""Data-free refinement (lorax_core.refine): the one entry point, its objectives, the content-keeping term,
its safety nets, its errors."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from lorax_core.errors import LoraxError, OptionError, ShapeMismatchError
from lorax_core.refine import (
    NullBranch,
    Probes,
    RefineOptions,
    RefineResult,
    Teachers,
    TrainableLora,
    distil,
    distillation_targets,
    factors_like,
    generation_split,
    make_probes,
    noise_levels,
    predict,
    refine,
)
from lorax_core.types import LoraFactors


class TinyDenoiser(torch.nn.Module):
    """``f(x, t, cond) = W2 · gelu(W1 · x + e_cond + t/1000)``: two adaptable linear layers."""

    def __init__(self, seed: int, dim: int = 12, hidden: int = 24, conds: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = torch.nn.Linear(dim, hidden, bias=False)
        self.l2 = torch.nn.Linear(hidden, dim, bias=False)
        with torch.no_grad():
            self.l1.weight.copy_(torch.randn(hidden, dim, generator=g) / dim**0.5)
            self.l2.weight.copy_(torch.randn(dim, hidden, generator=g) / hidden**0.5)
        self.register_buffer("emb", torch.randn(conds, hidden, generator=g) * 0.3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.l1(x) + self.emb[cond] + t[:, None].float() / 1000)
        return self.l2(h)


KEYS = ("l1.weight", "l2.weight")


def _lora(model: TinyDenoiser, rank: int = 2, seed: int = 5) -> dict[str, LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in KEYS:
        w = model.get_parameter(key)
        out[key] = LoraFactors(up=torch.randn(w.shape[0], rank, generator=g) * 0.5,
                               down=torch.randn(rank, w.shape[1], generator=g) * 0.5, alpha=float(rank))  # fmt: skip
    return out


def _with(model: TinyDenoiser, layers: dict[str, LoraFactors]):
    state = {k: v.detach() for k, v in model.named_parameters()}
    for key, f in layers.items():
        state[key] = state[key] + f.scale * f.up2d() @ f.down2d()

    def f(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return functional_call(model, state, (x, t, c))

    return f


def _student(model: TinyDenoiser, lora: TrainableLora):
    base = {k: v.detach() for k, v in model.named_parameters()}

    def f(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        state = dict(base)
        for i, key in enumerate(lora.keys):
            state[key] = base[key] + lora.delta(i, base[key].shape)
        return functional_call(model, state, (x, t, c))

    return f


def _noiser(x0: torch.Tensor, level: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = (level * 999).round().long()
    a = (1 - t.float() / 1000)[:, None]
    return a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g), t


def _world(seed: int = 0, drift: float = 0.4):
    source = TinyDenoiser(1)
    target = TinyDenoiser(1)
    g = torch.Generator().manual_seed(99 + seed)
    with torch.no_grad():
        for key in KEYS:
            w = target.get_parameter(key)
            w.add_(drift * torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5)
    lora = _lora(source)
    latents = torch.randn(16, 12, generator=g)
    probes = make_probes(latents, torch.arange(16) % 2, _noiser, 96, null_cond=2, seed=seed)
    return source, target, lora, probes


NULL = 2  # the tiny world's neutral prompt (conditioning index)
LATENTS = torch.randn(16, 12, generator=torch.Generator().manual_seed(7))
PROMPTS = torch.arange(16) % 2


def _scope(f):
    return lambda body: body(f)


def _distil(source, target, lora, start, options: RefineOptions, null_cond: int | None = NULL,
            **kwargs) -> tuple[TrainableLora, RefineResult]:  # fmt: skip
    """The whole recipe through the one entry point, as the node and the benchmark run it."""
    trainable = TrainableLora(start)
    teachers = Teachers(_scope(_with(source, lora)), _scope(_with(source, {})), _scope(_with(target, {})))
    result = distil(list(trainable.parameters()), _scope(_student(target, trainable)), teachers, LATENTS, PROMPTS,
                    _noiser, options, null_cond=null_cond, **kwargs)  # fmt: skip
    return trainable, result


def _guidance_agreement(student, target, probes: Probes) -> float:
    """Mean cosine between the student's and the bare target's guidance directions f(x, c) − f(x, ∅)."""
    null = probes.under(NULL)
    with torch.no_grad():
        ds = student(probes.x, probes.t, probes.cond) - student(null.x, null.t, null.cond)
        dt = target(probes.x, probes.t, probes.cond) - target(null.x, null.t, null.cond)
    return float(torch.nn.functional.cosine_similarity(ds, dt, dim=1).mean())


@pytest.mark.parametrize(
    ("objective", "keep_guidance", "null_cond"),
    [("effect", 0.5, NULL), ("effect", 0.0, None), ("output", 0.0, NULL), ("blend", 0.5, NULL)],
)
def test_distil_reduces_training_and_heldout_loss(objective: str, keep_guidance: float, null_cond: int | None) -> None:
    torch.manual_seed(0)
    source, target, lora, _ = _world()
    options = RefineOptions(objective=objective, keep_guidance=keep_guidance, steps=150, lr=1e-2, batch=16, probes=96)  # type: ignore[arg-type]
    trainable, result = _distil(source, target, lora, lora, options, null_cond)
    assert len(result.losses) == 150 and result.probes == 96
    assert sum(result.losses[-10:]) / 10 < 0.5 * sum(result.losses[:10]) / 10
    assert result.kept == "refined"
    assert result.holdout_after < 0.5 * result.holdout_before
    assert result.baseline is not None and result.baseline > result.holdout_after
    refined = trainable.export()
    assert set(refined) == set(lora)
    for key in KEYS:
        assert refined[key].up.shape == lora[key].up.shape and refined[key].alpha == lora[key].alpha
        assert not torch.equal(refined[key].up, lora[key].up)


def test_keep_guidance_keeps_the_targets_content_where_plain_effect_drops_it() -> None:
    # The start barely changes the target (a weak transfer): its guidance direction, which carries
    # the prompt's content, is the target's own. The source LoRA bends the source's guidance
    # direction; plain effect matching carries that bend over and drops the agreement with the
    # target's direction; the content-keeping term holds it while the effect is still learnt.
    source, target, lora, _ = _world()
    weak = {k: LoraFactors(up=f.up * 0.05, down=f.down, alpha=f.alpha) for k, f in lora.items()}
    fresh = make_probes(LATENTS, PROMPTS, _noiser, 256, seed=11)
    bare = _with(target, {})
    start = _guidance_agreement(_with(target, weak), bare, fresh)
    agreement, effect_error = {}, {}
    for weight in (0.0, 2.0):
        trainable, result = _distil(source, target, lora, weak, RefineOptions(keep_guidance=weight, steps=150,
                                                                              lr=1e-2, batch=16, probes=96))  # fmt: skip
        assert result.kept == "refined"
        student = _student(target, trainable)
        agreement[weight] = _guidance_agreement(student, bare, fresh)
        # the LoRA's effect on fresh probes: target + refined LoRA − target ≈ source + LoRA − source
        want = predict(_with(source, lora), fresh) - predict(_with(source, {}), fresh)
        effect_error[weight] = float(((predict(student, fresh) - predict(bare, fresh) - want) ** 2).mean()
                                     / (want**2).mean())  # fmt: skip
    assert start > 0.95
    assert agreement[0.0] < start - 0.2  # plain effect drops the target's content
    assert agreement[2.0] > agreement[0.0] + 0.1  # the term keeps much of it
    assert effect_error[2.0] < 0.8 and effect_error[0.0] < 0.8  # both still learn the LoRA's effect


def test_content_keeping_term_never_trades_away_an_effect_the_transfer_already_has() -> None:
    # Target = source and the start = the source LoRA itself: the transfer already reproduces the
    # LoRA's effect exactly (fit 0). The LoRA bends the guidance direction, so the content-keeping
    # term alone is > 0 and optimising it would pull the effect away from the teacher's; the
    # result must be the start, with the reason in the summary.
    source, _, lora, _ = _world()
    trainable, result = _distil(source, source, lora, lora, RefineOptions(keep_guidance=2.0, steps=60, lr=1e-2,
                                                                          batch=16, probes=96))  # fmt: skip
    assert result.fit_before < 1e-10 < result.holdout_before
    assert result.kept == "start" and result.fit_after == result.fit_before
    for key in KEYS:
        assert torch.equal(trainable.export()[key].up, lora[key].up)
    assert "already reproduces that effect" in result.summary()
    assert result.metadata()["lorax.refine.holdout_fit_before"] == f"{result.fit_before:.6g}"
    # the same run without the term has nothing to do either (and says so the usual way)
    _, plain = _distil(source, source, lora, lora, RefineOptions(keep_guidance=0.0, steps=5, probes=96))
    assert plain.kept == "start" and plain.fit_before == plain.holdout_before
    assert "did not improve" in plain.summary()


def test_refine_with_null_branch_runs_prompt_and_neutral_twins_in_one_batch() -> None:
    source, target, lora, probes = _world()
    teacher = predict(_with(source, lora), probes)
    twins = probes.under(NULL)
    trainable = TrainableLora(lora)
    inner = _student(target, trainable)
    seen: list[torch.Tensor] = []

    def student(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        seen.append(c)
        return inner(x, t, c)

    bare = predict(_with(target, {}), probes)
    null = NullBranch(NULL, predict(_with(source, lora), twins), bare - predict(_with(target, {}), twins), 0.5)
    result = refine(list(trainable.parameters()), student, probes, teacher, RefineOptions(steps=3, batch=4),
                    null=null, baseline=bare)  # fmt: skip
    assert result.baseline is not None and result.baseline > 0
    step_batches = seen[-4:-1]  # the last call is the held-out pass after training; the three before, the steps
    for c in step_batches:
        assert len(c) == 8 and bool((c[4:] == NULL).all())
    with pytest.raises(ShapeMismatchError, match=r"refine: null.guide of shape \(95, 12\) do not match probes"):
        refine(list(trainable.parameters()), student, probes, teacher, RefineOptions(steps=1),
               null=NullBranch(NULL, teacher, teacher[:95], 0.5))  # fmt: skip


def test_distil_reports_progress_over_teacher_passes_and_steps() -> None:
    source, target, lora, _ = _world()
    seen: list[tuple[int, int]] = []
    checks = {"n": 0}

    def check() -> None:
        checks["n"] += 1

    options = RefineOptions(steps=5, batch=16, probes=32)
    _distil(source, target, lora, lora, options, progress=lambda d, t: seen.append((d, t)), check=check)
    # 3 teacher passes over 32 probes + their 32 neutral twins in chunks of 16, then 5 steps
    total = 3 * 4 + 5
    assert seen[-1] == (total, total) and [d for d, _ in seen] == list(range(1, total + 1))
    assert checks["n"] == total
    seen.clear()
    _distil(source, target, lora, lora, RefineOptions(objective="output", keep_guidance=0.0, steps=5, batch=16,
                                                      probes=32), null_cond=None, progress=lambda d, t: seen.append((d, t)))  # fmt: skip
    assert seen[-1] == (2 * 2 + 5, 2 * 2 + 5)  # output needs no source-without-LoRA pass; no twins


def test_distil_errors() -> None:
    source, target, lora, _ = _world()
    with pytest.raises(OptionError, match=r"refine keep_guidance=0\.5 needs a neutral prompt"):
        _distil(source, target, lora, lora, RefineOptions(keep_guidance=0.5), null_cond=None)
    trainable = TrainableLora(lora)
    teachers = Teachers(_scope(_with(source, lora)), None, _scope(_with(target, {})))
    with pytest.raises(OptionError, match="refine objective 'effect' needs the source model without its LoRA"):
        distil(list(trainable.parameters()), _scope(_student(target, trainable)), teachers, LATENTS, PROMPTS, _noiser,
               RefineOptions(), null_cond=NULL)  # fmt: skip


def test_blend_lies_between_effect_and_output() -> None:
    teacher, teacher_base, target_base = torch.randn(3, 5, 4).unbind(0)
    effect = distillation_targets("effect", teacher, teacher_base, target_base)
    output = distillation_targets("output", teacher, teacher_base, target_base)
    assert torch.allclose(distillation_targets("blend", teacher, teacher_base, target_base, 0.0), effect)
    assert torch.allclose(distillation_targets("blend", teacher, teacher_base, target_base, 1.0), output)
    assert torch.allclose(distillation_targets("blend", teacher, teacher_base, target_base, 0.25),
                          0.75 * effect + 0.25 * output)  # fmt: skip
    with pytest.raises(OptionError, match="refine objective 'blend' needs the source model's"):
        distillation_targets("blend", teacher)


def test_effect_objective_is_zero_when_target_equals_source() -> None:
    source, _, lora, probes = _world()
    base = predict(_with(source, {}), probes)
    targets = distillation_targets("effect", predict(_with(source, lora), probes), base, base)
    trainable = TrainableLora(lora)
    result = refine(list(trainable.parameters()), _student(source, trainable), probes, targets,
                    RefineOptions(steps=5, lr=1e-3), baseline=base)  # fmt: skip
    assert result.holdout_before < 1e-10
    assert result.baseline is not None and result.baseline > 1e-3
    # nothing to improve: the starting LoRA is kept exactly
    assert result.kept == "start"
    assert torch.equal(trainable.export()["l1.weight"].up, lora["l1.weight"].up)


def test_refine_keeps_start_when_heldout_gets_worse() -> None:
    source, target, lora, probes = _world()
    targets = predict(_with(source, lora), probes)
    trainable = TrainableLora(lora)
    before = [p.detach().clone() for p in trainable.parameters()]
    # a learning rate this large overshoots; the held-out check must restore the start
    result = refine(list(trainable.parameters()), _student(target, trainable), probes, targets,
                    RefineOptions(objective="output", steps=3, lr=1.0, batch=4, max_grad_norm=1e6))  # fmt: skip
    if result.kept == "start":
        for p, b in zip(trainable.parameters(), before, strict=True):
            assert torch.equal(p, b)
        assert result.holdout_after == result.holdout_before
    else:
        assert result.holdout_after < result.holdout_before


def test_non_finite_loss_restores_start_and_says_what_to_do() -> None:
    source, target, lora, probes = _world()
    targets = predict(_with(source, lora), probes)
    trainable = TrainableLora(lora)
    before = [p.detach().clone() for p in trainable.parameters()]
    calls = {"n": 0}
    inner = _student(target, trainable)

    def student(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        out = inner(x, t, c)
        return out * float("nan") if calls["n"] > 15 else out

    with pytest.raises(LoraxError, match=r"refine: the loss became nan at step \d+; the starting LoRA was kept"):
        refine(list(trainable.parameters()), student, probes, targets, RefineOptions(objective="output", steps=20))
    for p, b in zip(trainable.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_check_stops_the_loop() -> None:
    source, target, lora, probes = _world()
    targets = predict(_with(source, lora), probes)
    trainable = TrainableLora(lora)
    seen: list[int] = []

    class StopError(Exception):
        pass

    def check() -> None:
        if len(seen) >= 4:
            raise StopError

    with pytest.raises(StopError):
        refine(list(trainable.parameters()), _student(target, trainable), probes, targets,
               RefineOptions(objective="output", steps=50), progress=lambda d, t: seen.append(d), check=check)  # fmt: skip
    assert seen == [1, 2, 3, 4]


def test_make_probes_pairs_latents_with_their_prompts_and_the_neutral_one() -> None:
    latents = torch.randn(8, 12)
    conds = torch.tensor([0, 1] * 4)
    probes = make_probes(latents, conds, _noiser, 400, null_cond=7, null_fraction=0.25, seed=3)
    assert probes.x.shape == (400, 12) and probes.t.shape == (400,) and probes.x.dtype == torch.float32
    share = float((probes.cond == 7).float().mean())
    assert 0.18 < share < 0.32
    assert set(probes.cond.tolist()) == {0, 1, 7}
    again = make_probes(latents, conds, _noiser, 400, null_cond=7, seed=3)
    assert torch.equal(again.x, probes.x)
    assert not (make_probes(latents, conds, _noiser, 40, seed=3).cond == 7).any()


@pytest.mark.parametrize("bias", [0.0, 1.5])
def test_noise_levels_are_logit_normal_around_the_bias(bias: float) -> None:
    levels = noise_levels(20000, bias, torch.Generator().manual_seed(0))
    assert levels.shape == (20000,) and levels.dtype == torch.float32
    assert float(levels.min()) > 0.0 and float(levels.max()) < 1.0
    logits = torch.logit(levels.double())
    assert float(logits.mean()) == pytest.approx(bias, abs=0.03) and float(logits.std()) == pytest.approx(1.0, abs=0.03)
    assert float(levels.median()) == pytest.approx(torch.sigmoid(torch.tensor(bias)).item(), abs=0.01)
    # the default (1.5) puts 93 % of the probes in the noisier half of the schedule
    assert float((levels > 0.5).float().mean()) == pytest.approx(0.5 if bias == 0 else 0.933, abs=0.01)


def test_make_probes_noises_at_the_levels_the_options_ask_for() -> None:
    seen: list[torch.Tensor] = []

    def noiser(x0: torch.Tensor, level: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(level)
        return _noiser(x0, level, g)

    latents, conds = torch.randn(8, 12), torch.tensor([0, 1] * 4)
    centred = make_probes(latents, conds, noiser, 2000, seed=1, timestep_bias=0.0)
    noisy = make_probes(latents, conds, noiser, 2000, seed=1, timestep_bias=1.5)
    assert [len(level) for level in seen] == [2000, 2000]
    assert torch.equal(centred.t, (seen[0] * 999).round().long()) and torch.equal(noisy.t, (seen[1] * 999).round().long())
    assert float(centred.t.float().median()) == pytest.approx(500, abs=30)
    assert float(noisy.t.float().median()) == pytest.approx(817, abs=20)
    # the default is the option's default
    assert torch.equal(make_probes(latents, conds, _noiser, 64, seed=2).t,
                       make_probes(latents, conds, _noiser, 64, seed=2,
                                   timestep_bias=RefineOptions().timestep_bias).t)  # fmt: skip


def test_factors_like_restores_conv_layout_dtype_and_alpha() -> None:
    original = LoraFactors(up=torch.randn(6, 2, 1, 1, dtype=torch.float16), down=torch.randn(2, 3, 3, 3,
                           dtype=torch.float16), alpha=1.0)  # fmt: skip
    trainable = TrainableLora({"conv.weight": original})
    exported = trainable.export()["conv.weight"]
    assert exported.up.shape == (6, 2, 1, 1) and exported.down.shape == (2, 3, 3, 3)
    assert exported.up.dtype == torch.float16 and exported.alpha == 1.0
    assert torch.equal(exported.up, original.up) and torch.equal(exported.down, original.down)
    with pytest.raises(LoraxError, match=r"refined factors are not finite in torch\.float16"):
        factors_like(original, torch.full((6, 2), 1e6), torch.ones(2, 27))
    with pytest.raises(ShapeMismatchError, match=r"refined factors \(6, 3\)/\(2, 27\) do not fit"):
        factors_like(original, torch.ones(6, 3), torch.ones(2, 27))


def test_result_metadata_and_summary() -> None:
    source, target, lora, probes = _world()
    targets = predict(_with(source, lora), probes)
    trainable = TrainableLora(lora)
    result = refine(list(trainable.parameters()), _student(target, trainable), probes, targets,
                    RefineOptions(objective="output", steps=30, lr=1e-2, seed=4))  # fmt: skip
    meta = result.metadata()
    assert meta["lorax.refined"] == "true" and meta["lorax.refine.objective"] == "output"
    assert meta["lorax.refine.steps"] == "30" and meta["lorax.refine.seed"] == "4"
    assert meta["lorax.refine.probes"] == "96" and meta["lorax.refine.target_share"] == "0"
    assert meta["lorax.refine.timestep_bias"] == "1.5"
    assert all(isinstance(v, str) for v in meta.values())
    assert result.summary().startswith("Refined (output matching): 30 steps")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"objective": "both"}, "refine objective 'both' is not one of effect, output, blend"),
        ({"output_weight": 1.5}, r"refine output_weight must be in \[0, 1\]; got 1.5"),
        ({"steps": -1}, "refine steps must be an integer ≥ 0; got -1"),
        ({"lr": 0.0}, r"refine learning rate must be in \(0, 1\]; got 0.0"),
        ({"lr": float("nan")}, r"refine learning rate must be in \(0, 1\]; got nan"),
        ({"batch": 0}, "refine batch must be a positive integer; got 0"),
        ({"holdout": 1.0}, r"refine holdout must be a fraction in \(0, 1\); got 1.0"),
        ({"max_grad_norm": 0.0}, "refine max_grad_norm must be > 0"),
        ({"keep_guidance": -1.0}, "refine keep_guidance must be a number ≥ 0; got -1.0"),
        ({"keep_guidance": float("inf")}, "refine keep_guidance must be a number ≥ 0; got inf"),
        ({"probes": 4}, "refine probes must be an integer ≥ 8; got 4"),
        ({"target_share": 1.5}, r"refine target_share must be in \[0, 1\]; got 1.5"),
        ({"target_share": float("nan")}, r"refine target_share must be in \[0, 1\]; got nan"),
        ({"timestep_bias": 7.0}, r"refine timestep_bias must be a number in \[-6, 6\]; got 7.0. Try 1.5"),
        ({"timestep_bias": float("nan")}, r"refine timestep_bias must be a number in \[-6, 6\]; got nan"),
        ({"timestep_bias": "1"}, r"refine timestep_bias must be a number in \[-6, 6\]; got '1'"),
    ],
)
def test_option_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(OptionError, match=message):
        RefineOptions(**kwargs)  # type: ignore[arg-type]


def test_input_errors() -> None:
    x = torch.randn(4, 12)
    with pytest.raises(OptionError, match="refine needs at least one generated latent"):
        make_probes(torch.empty(0, 12), torch.empty(0, dtype=torch.int64), _noiser, 4)
    with pytest.raises(OptionError, match="refine: 4 latents but \\(3,\\) conditioning indices"):
        make_probes(x, torch.zeros(3, dtype=torch.int64), _noiser, 4)
    with pytest.raises(OptionError, match="refine needs at least one probe; got count=0"):
        make_probes(x, torch.zeros(4, dtype=torch.int64), _noiser, 0)
    with pytest.raises(OptionError, match="refine objective 'effect' needs the source model's and the target"):
        distillation_targets("effect", x)
    probes = Probes(x, torch.zeros(4), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ShapeMismatchError, match=r"refine: the model returned shape \(4, 3\)"):
        predict(lambda a, t, c: a[:, :3], probes)
    with pytest.raises(LoraxError, match="refine: a model returned NaN/Inf on the synthetic inputs"):
        predict(lambda a, t, c: a * float("inf"), probes)
    with pytest.raises(OptionError, match="refine: the LoRA has no trainable factors"):
        refine([], lambda a, t, c: a, probes, x, RefineOptions())
    with pytest.raises(OptionError, match="refine: every factor must be a leaf tensor with requires_grad=True"):
        refine([torch.zeros(2)], lambda a, t, c: a, probes, x, RefineOptions())
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ShapeMismatchError, match=r"refine: targets of shape \(4, 2\) do not match probes"):
        refine([p], lambda a, t, c: a, probes, x[:, :2], RefineOptions())
    with pytest.raises(OptionError, match="refine needs more probes than the held-out share: 1 probes"):
        refine([p], lambda a, t, c: a, probes.take(torch.arange(1)), x[:1], RefineOptions())


@pytest.mark.parametrize(
    ("total", "share", "split"),
    [(8, 0.0, (8, 0)), (8, 1.0, (0, 8)), (8, 0.5, (4, 4)), (7, 0.5, (3, 4)), (8, 0.25, (6, 2)),
     (10, 0.01, (9, 1)), (10, 0.99, (1, 9)), (1, 0.5, (1, 0)), (2, 0.5, (1, 1))],
)
def test_generation_split_shares_out_every_generation(total: int, share: float, split: tuple[int, int]) -> None:
    assert generation_split(total, RefineOptions(target_share=share)) == split


def test_generation_split_needs_a_generation() -> None:
    with pytest.raises(OptionError, match="refine needs at least one generation; got 0"):
        generation_split(0, RefineOptions())
