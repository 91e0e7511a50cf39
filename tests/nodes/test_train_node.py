"""Train LoRA-X and Save LoRA-X on the tiny SD1.5 UNet inside a real, in-process ComfyUI v0.3.75.

The model is loaded and the nodes run under ``torch.inference_mode()``, as ComfyUI's executor
runs them. The training data are four random 4×4 latents with one random prompt (no text encoder
needed); a few dozen steps of ΔΣ on the attention layers must lower the denoising loss on them,
measured at fixed noise and timesteps (not the noisy per-step training loss).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from comfy_harness import leftovers, pack_module
from safetensors import safe_open

pytestmark = pytest.mark.comfy

TRAIN = {
    "steps": 12,
    "learning_rate": 0.2,
    "rank": 8,
    "layers": "all linear + conv",
    "batch_size": 2,
    "seed": 1,
    "training_dtype": "fp32",
    "use_cache": True,
}
KEY = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
CONV = "diffusion_model.out.2.weight"  # (4, 320, 3, 3): conv layout, and R clipped to 4


def _conditioning(seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 768, generator=g), {}]]


def _latents(count: int = 4) -> dict:
    # One pattern, four times: a "dataset" of one image, which the adapter can learn in a few steps.
    pattern = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    return {"samples": pattern.repeat(count, 1, 1, 1)}


@pytest.fixture(scope="module")
def source(tiny, folders):
    """The tiny source UNet MODEL, loaded under inference mode as a loader node would load it."""
    import comfy.sd

    with torch.inference_mode():
        return comfy.sd.load_diffusion_model(str(tiny.source_unet))


def _train(model, **overrides):
    node = pack_module("nodes.train").LoraXTrainLoRAX
    with torch.inference_mode():
        return node.execute(
            **{"model": model, "latents": _latents(), "positive": _conditioning(), **TRAIN, **overrides}
        )


@pytest.fixture(scope="module")
def trained(source) -> Iterator[tuple]:
    import comfy.utils

    seen: list[tuple[int, int]] = []
    # Module-scoped fixtures run before the autouse one-thread fixture: set it here too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        yield _train(source), seen
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        torch.set_num_threads(threads)


def _denoise_loss(model, latents: torch.Tensor, cond: list) -> float:
    """ComfyUI's training loss (x0 MSE) at fixed noise and σ, through the guider (no training)."""
    refine_host = pack_module("nodes._refine_host")
    sampling = model.get_model_object("model_sampling")
    x0 = model.model.process_latent_in(latents).float()
    g = torch.Generator().manual_seed(11)
    reps = 8
    x0 = x0.repeat(reps, 1, 1, 1)
    sigma = torch.tensor([float(sampling.percent_to_sigma(p)) for p in torch.linspace(0.05, 0.95, len(x0)).tolist()])
    noise = torch.randn(x0.shape, generator=g)
    xt = sampling.noise_scaling(sigma, noise, x0, False)

    def body(denoiser):
        eps = denoiser(xt, sigma, torch.zeros(len(x0), dtype=torch.int64)).cpu()
        denoised = xt - sigma.reshape(-1, 1, 1, 1) * eps
        return float(((denoised - x0) ** 2).mean())

    with torch.inference_mode():
        return refine_host.with_denoiser(model, [cond], tuple(x0.shape), body, seed=0)


def test_nodes_are_registered_with_tooltips_quoted_in_the_docs(node_classes):
    docs = (Path(__file__).resolve().parents[2] / "docs" / "NODES.md").read_text()
    for node_id, display in (("LoraXTrainLoRAX", "Train LoRA-X"), ("LoraXSaveLoRAX", "Save LoRA-X")):
        schema = node_classes[node_id].GET_SCHEMA()
        assert schema.display_name == display and schema.category == "LoRA-X"
        for item in [*schema.inputs, *(schema.outputs or [])]:
            assert item.tooltip and item.tooltip in docs, f"docs/NODES.md lacks the tooltip of {node_id}.{item.id}"


def test_training_lowers_the_denoising_loss(trained, source):
    out, seen = trained
    model, lorax, _, chart, report = out.result
    latents = _latents()["samples"]
    before = _denoise_loss(source, latents, _conditioning())
    after = _denoise_loss(model, latents, _conditioning())
    assert after < 0.93 * before, (before, after)  # measured: 19.08 → 16.11 (−16 %)
    layers = [
        f"diffusion_model.{n}.weight"
        for n, m in source.model.diffusion_model.named_modules()
        if hasattr(m, "weight_function") and getattr(m, "weight", None) is not None and m.weight.ndim in (2, 4)
    ]
    assert sorted(lorax.factors) == sorted(layers)
    assert all(f.rank == min(8, f.shape[0]) and f.core.ndim == 1 for f in lorax.factors.values())
    assert seen and seen[-1] == (TRAIN["steps"], TRAIN["steps"])  # ComfyUI's progress bar, one tick per step
    assert chart.shape[0] == 1 and chart.shape[-1] == 3
    assert f"{len(layers)} all linear + conv layers, R=8" in report and "Training loss" in report
    assert "Not trained: 27 weights, 1-D weight" in report and "1 of the layers is narrower than R" in report


def test_outputs_carry_the_same_delta_w(trained, source):
    """The trained MODEL, the standard ``lora`` (through the stock loader) and the LoRA-X cores agree."""
    from comfy_extras.nodes_train import LoraModelLoader

    from lorax_core.linalg import top_subspace

    model, lorax, lora, _, _ = trained[0].result
    host = pack_module("nodes._host")
    with torch.inference_mode():
        stock = LoraModelLoader.execute(source, lora, 1.0).result[0]
    for key in (KEY, CONV):
        base = host.PatcherWeights(source).get(key)
        core = lorax.factors[key].core
        sub = top_subspace(base, core.shape[0])
        want = ((sub.U * core) @ sub.V.T).reshape(base.shape)  # U_R·diag(ΔΣ)·V_Rᵀ, bases recomputed
        assert float(core.abs().max()) > 0
        for patched in (model, stock):
            torch.testing.assert_close(host.PatcherWeights(patched).get(key) - base, want, rtol=1e-4, atol=1e-5)
    base = host.PatcherWeights(source).get(KEY)
    core = lorax.factors[KEY].core
    # The lorax output is a LoRA-X LORA_MODEL: cores and shapes only.
    native = KEY.removesuffix(".weight")
    assert torch.equal(lorax[f"{native}.lorax_core"], core)
    assert lorax[f"{native}.lorax_shape"].tolist() == list(base.shape)
    meta = lorax.metadata
    assert meta["lorax.rank"] == "8" and meta["lorax.source_fingerprint"] == host.PatcherWeights(source).fingerprint
    assert json.loads(meta["lorax.basis_check"])["layers"]


def test_save_writes_the_lorax_file_and_exact_and_compressed_standard_loras(trained, source, folders, tiny):
    import comfy.sd
    import comfy.utils

    save = pack_module("nodes.save").LoraXSaveLoRAX
    host = pack_module("nodes._host")
    lorax = trained[0].result[1]
    base = host.PatcherWeights(source).get(KEY)
    want = lorax.standard[KEY].up2d() @ lorax.standard[KEY].down2d()
    names = []
    for rank in (0, 3):
        with torch.inference_mode():
            out = save.execute(lorax=lorax, file_name="trained", standard_lora=True, standard_rank=rank)
        lorax_name, lora_name = out.result
        names.append(lorax_name)
        path = folders / lora_name
        with safe_open(str(folders / lorax_name), "pt") as f:
            assert f.metadata()["lorax.format"] == "lorax-core" and f.metadata()["lorax.basis_check"]
            assert f"{KEY.removesuffix('.weight')}.lorax_core" in f.keys()
        with safe_open(str(path), "pt") as f:
            error = float(f.metadata()["lorax.export_error"])
        # The stock loader path (load_torch_file + load_lora_for_models) reads the standard file.
        with torch.inference_mode():
            patched, _ = comfy.sd.load_lora_for_models(source, None, comfy.utils.load_torch_file(str(path)), 1.0, 0)
        got = (host.PatcherWeights(patched).get(KEY) - base).detach()
        if rank == 0:
            assert error == 0.0
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        else:
            delta = lorax.factors[KEY].core.abs().sort(descending=True).values
            layer_error = float(delta[3:].norm() / delta.norm())
            assert float((got - want).norm() / want.norm()) == pytest.approx(layer_error, rel=1e-2)
            assert error >= layer_error - 1e-6 and f"{error:.3g}" in out.ui.value
    assert names == ["lorax/trained.safetensors", "lorax/trained_00001.safetensors"]  # never overwritten


def test_saved_lorax_file_transfers_and_its_bases_are_checked(trained, tiny, folders):
    """Transfer LoRA takes the saved file (a LoRA-X transfer); the basis record accepts the source file only."""
    import comfy.sd

    # The pack's own modules (the nodes raise the pack's error classes, not the repo-level ones).
    read_lora = pack_module("lorax_core.formats").read_lora
    check_lorax_source = pack_module("lorax_core.lorax_export").check_lorax_source
    SubspaceProvider = pack_module("lorax_core.subspaces").SubspaceProvider
    IncompatibleBaseError = pack_module("lorax_core.errors").IncompatibleBaseError

    save = pack_module("nodes.save").LoraXSaveLoRAX
    load = pack_module("nodes.load").LoraXLoadSourceModel
    transfer = pack_module("nodes.transfer").LoraXTransferLoRA
    lorax = trained[0].result[1]
    with torch.inference_mode():
        name = save.execute(lorax=lorax, file_name="for_transfer").result[0]
        target = comfy.sd.load_diffusion_model(str(tiny.target_unet))
        src = load.execute(tiny.source_unet.name).result[0]
        out = transfer.execute(source=src, target=target, lora_name=name, method="auto", rank=320, threshold=0.0)
    result, report = out.result
    assert len(result.factors) == len(lorax.factors) and "lorax" in report
    assert {r.method for r in result.report.layers} == {"lorax"}
    # The same input as a LORA_MODEL (Train LoRA-X's lorax output straight into Transfer LoRA).
    with torch.inference_mode():
        direct = transfer.execute(
            source=src, target=target, lora_name="(none)", method="auto", rank=320, threshold=0.0, lora=lorax
        ).result[0]
    for key, f in result.factors.items():
        torch.testing.assert_close(
            direct.factors[key].up2d() @ direct.factors[key].down2d(), f.up2d() @ f.down2d(), rtol=1e-4, atol=1e-5
        )
    file = read_lora(folders / name)
    assert "checked on" in check_lorax_source(file.metadata, file.layers, src.weights, SubspaceProvider())

    class Permuted:
        """The source file with each weight's output units permuted: same spectrum, other bases."""

        fingerprint = "permuted"

        def __init__(self, inner) -> None:
            self.inner = inner

        def keys(self):
            return self.inner.keys()

        def __contains__(self, key: object) -> bool:
            return key in self.inner

        def shape(self, key: str) -> tuple[int, ...]:
            return self.inner.shape(key)

        def get(self, key: str) -> torch.Tensor:
            w = self.inner.get(key)
            return w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))]

    with pytest.raises(IncompatibleBaseError, match="differ from those the LoRA-X file was trained in"):
        check_lorax_source(file.metadata, file.layers, Permuted(src.weights), SubspaceProvider())
    with torch.inference_mode():
        vega = load.execute(tiny.vega_source_unet.name).result[0]
    # Another model with the same layer names and shapes (the tiny "vega" UNet): other bases.
    with pytest.raises(IncompatibleBaseError, match=r"bases of layer .* differ .*\(fingerprint"):
        check_lorax_source(file.metadata, file.layers, vega.weights, SubspaceProvider())


def test_user_errors_name_the_node_and_the_fix(source):
    errors = pack_module("lorax_core.errors")
    FormatError, OptionError = errors.FormatError, errors.OptionError
    save = pack_module("nodes.save").LoraXSaveLoRAX
    with pytest.raises(FormatError, match=r"^Save LoRA-X: lorax is a plain LORA_MODEL .*connect the lorax output"):
        save.execute(lorax={"x.lora_up.weight": torch.zeros(2, 1)}, file_name="x")
    assert "must be a plain file name" in save.validate_inputs("a/b")
    with pytest.raises(OptionError, match=r"^Train LoRA-X: positive holds 2 conditionings for 4 latents"):
        _train(source, positive=_conditioning() + _conditioning(2))
    with pytest.raises(OptionError, match=r"^Train LoRA-X: latents has shape \(4, 3, 4, 4\) .*4-channel"):
        _train(source, latents={"samples": torch.ones(4, 3, 4, 4)})
    with pytest.raises(OptionError, match="latents must be a LATENT"):
        _train(source, latents={"samples": torch.zeros(4, 4)})
    with pytest.raises(OptionError, match="latents has batch size 0"):
        _train(source, latents={"samples": torch.zeros(0, 4, 4, 4)})


def test_cancel_stops_training_and_leaves_the_input_model_as_it_was(trained, source):
    """Cancel (ComfyUI's interrupt flag, checked by its progress hook each step) restores the shared modules."""
    import comfy.model_management as mm
    import comfy.utils

    assert not leftovers(source) and not source.patches  # after the normal run, too
    comfy.utils.set_progress_bar_global_hook(lambda *_, **__: mm.throw_exception_if_processing_interrupted())
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _train(source, steps=3)
    finally:
        mm.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(None)
    assert not leftovers(source) and not source.patches


def test_transfer_node_refuses_a_lorax_file_on_another_source(trained, tiny, folders):
    """Transfer LoRA checks a LoRA-X file's basis record against the connected source model."""
    import comfy.sd

    save = pack_module("nodes.save").LoraXSaveLoRAX
    load = pack_module("nodes.load").LoraXLoadSourceModel
    transfer = pack_module("nodes.transfer").LoraXTransferLoRA
    errors = pack_module("lorax_core.errors")
    lorax = trained[0].result[1]
    with torch.inference_mode():
        name = save.execute(lorax=lorax, file_name="refused").result[0]
        target = comfy.sd.load_diffusion_model(str(tiny.target_unet))
        right = load.execute(tiny.source_unet.name).result[0]
        wrong = load.execute(tiny.vega_source_unet.name).result[0]
        report = transfer.execute(source=right, target=target, lora_name=name, method="auto", rank=320,
                                  threshold=0.0).result[1]
        with pytest.raises(errors.IncompatibleBaseError,
                           match=r"^Transfer LoRA: the source model's bases of layer .* differ .*\(fingerprint"):
            transfer.execute(source=wrong, target=target, lora_name=name, method="auto", rank=320, threshold=0.0)
    assert "LoRA-X bases checked on" in report
