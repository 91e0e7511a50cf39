"""The ``use_cache`` widget of Transfer LoRA and Compute Subspace Similarity: disk cache in ComfyUI's user folder."""

from __future__ import annotations

from pathlib import Path

import folder_paths
import pytest
import torch
from comfy_harness import pack_module

pytestmark = pytest.mark.comfy

WIDGET_TYPES = {"COMBO", "INT", "FLOAT", "BOOLEAN", "STRING"}
# Cache entries store U and V in float16 (lorax_core/cache.py): ≈ 4e-4 relative on a ΔW.
FP16_STORAGE_RTOL = 1e-3


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ComfyUI user folder for one test (the node cache follows it)."""
    monkeypatch.setattr(folder_paths, "user_directory", str(tmp_path / "user"))
    return tmp_path / "user"


def _cache_files(user_dir: Path) -> list[Path]:
    return sorted((user_dir / "__lorax" / "subspace-cache").rglob("*.safetensors"))


def _source(name: str):
    return pack_module("nodes.load").LoraXLoadSourceModel.execute(name).result[0]


def _transfer(source, target, lora_name: str, use_cache: bool):
    node = pack_module("nodes.transfer").LoraXTransferLoRA
    return node.execute(source=source, target=target, lora_name=lora_name, method="auto", rank=320,
                        threshold=0.5, use_cache=use_cache).result[0]


def _similarity(source, target, lora_name: str, use_cache: bool):
    node = pack_module("nodes.similarity").LoraXSubspaceSimilarity
    return node.execute(source=source, target=target, lora_name=lora_name, rank=320, threshold=0.5,
                        use_cache=use_cache).result[0]


def _delta(factors) -> torch.Tensor:
    return factors.up2d().float() @ factors.down2d().float()


def _assert_same_lora(got, want, rtol: float) -> None:
    assert set(got.factors) == set(want.factors) and got.factors
    for key in want.factors:
        a, b = _delta(got.factors[key]), _delta(want.factors[key])
        err = float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))
        assert err <= rtol, f"{key}: relative ΔW difference {err:.2e} > {rtol}"


@pytest.mark.parametrize("node_id", ["LoraXTransferLoRA", "LoraXSubspaceSimilarity"])
def test_use_cache_is_the_last_widget_and_defaults_on(node_classes, node_id):
    schema = node_classes[node_id].GET_SCHEMA()
    widgets = [i for i in schema.inputs if i.get_io_type() in WIDGET_TYPES]
    assert widgets[-1].id == "use_cache"
    assert widgets[-1].get_io_type() == "BOOLEAN" and widgets[-1].default is True


def test_transfer_with_cache_writes_under_the_user_folder_and_reuses_it(tiny, unet_models, user_dir):
    host = pack_module("nodes._host")
    _, target = unet_models
    source = _source(tiny.source_unet.name)
    exact = _transfer(source, target, tiny.lora.name, use_cache=False)
    assert not user_dir.exists()  # bypassed: nothing created, nothing written

    first = _transfer(source, target, tiny.lora.name, use_cache=True)
    files = _cache_files(user_dir)
    # Source and target subspaces of each of the 48 UNet layers the LoRA patches.
    assert len(files) >= 2 * 48
    _assert_same_lora(first, exact, 1e-6)  # a miss returns the computed value, unrounded

    cache = host.subspace_cache(True)
    cache.clear()  # drop the in-memory layer: the next run reads the disk, as a new ComfyUI process would
    disk_hits = cache.backing.stats.hits
    second = _transfer(source, target, tiny.lora.name, use_cache=True)
    assert cache.backing.stats.hits - disk_hits == len(files)
    assert _cache_files(user_dir) == files  # nothing recomputed, nothing new written
    _assert_same_lora(second, exact, FP16_STORAGE_RTOL)


def test_transfer_without_cache_writes_nothing_and_recomputes(tiny, unet_models, user_dir):
    _, target = unet_models
    source = _source(tiny.source_unet.name)
    one = _transfer(source, target, tiny.lora.name, use_cache=False)
    two = _transfer(source, target, tiny.lora.name, use_cache=False)
    assert not user_dir.exists()
    _assert_same_lora(two, one, 1e-6)


def test_similarity_node_cache_on_and_off(tiny, unet_models, user_dir):
    host = pack_module("nodes._host")
    _, target = unet_models
    source = _source(tiny.source_unet.name)
    off = _similarity(source, target, tiny.lora.name, use_cache=False)
    assert not user_dir.exists()
    _similarity(source, target, tiny.lora.name, use_cache=True)
    assert _cache_files(user_dir)
    host.subspace_cache(True).clear()
    on = _similarity(source, target, tiny.lora.name, use_cache=True)
    by_key = {e.source_key: e for e in off.entries}
    assert len(on.entries) == len(off.entries) == 48
    for e in on.entries:
        assert e.phi_left == pytest.approx(by_key[e.source_key].phi_left, abs=FP16_STORAGE_RTOL)
        assert e.phi_right == pytest.approx(by_key[e.source_key].phi_right, abs=FP16_STORAGE_RTOL)
        assert e.passed == by_key[e.source_key].passed


def test_unusable_cache_folder_names_it_and_the_widget(tiny, unet_models, tmp_path, monkeypatch):
    errors = pack_module("lorax_core.errors")
    blocker = tmp_path / "user"
    blocker.write_text("a file where the user folder should be")
    monkeypatch.setattr(folder_paths, "user_directory", str(blocker))
    _, target = unet_models
    source = _source(tiny.source_unet.name)
    with pytest.raises(errors.CacheError, match=r"^Transfer LoRA: the subspace cache folder '.*__lorax.subspace-cache' "
                       r"cannot be created or written; .* or turn off use_cache on the node\.$"):
        _transfer(source, target, tiny.lora.name, use_cache=True)
    # The bypass needs no folder at all.
    assert _transfer(source, target, tiny.lora.name, use_cache=False).factors
