"""Fixtures of the in-process node tests; the host set-up itself is in comfy_harness.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import comfy_harness  # noqa: F401  (sets up ComfyUI on sys.path first; must precede the imports below)
import folder_paths
import pytest
import torch
from comfy_harness import comfy_nodes

from scripts.make_tiny_models import TinyModels, make_tiny_models


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One BLAS/OpenMP thread while a node test runs (restored after, so other tiers are unaffected).

    On the shared 2-core CI machine, two threads under load made a 320×320 ``eigh`` take
    seconds instead of milliseconds (measured); the tiny models need no more than one.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def user_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """ComfyUI's user folder (where the nodes keep their disk subspace cache) in a temp folder.

    Without it, every node test with ``use_cache`` on would write into the host's own
    ``.comfyui/user``. Tests that inspect the cache point it at their own ``tmp_path`` again.
    """
    before = folder_paths.get_user_directory()
    folder = tmp_path_factory.mktemp("user")
    folder_paths.set_user_directory(str(folder))
    yield folder
    folder_paths.set_user_directory(before)


@pytest.fixture(scope="session")
def tiny() -> TinyModels:
    """The tiny SD1.5 model set (generated once, cached under out/.cache)."""
    return make_tiny_models()


@pytest.fixture(scope="session")
def folders(tiny: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point ComfyUI's model folders at the tiny models; a fresh temp folder is the first ``loras`` folder.

    Returns the temp ``loras`` folder (where the save node writes).
    """
    saved = tmp_path_factory.mktemp("loras")
    for folder in ("checkpoints", "diffusion_models", "loras"):
        folder_paths.add_model_folder_path(folder, str(tiny.root / folder), is_default=True)
    folder_paths.add_model_folder_path("loras", str(saved), is_default=True)
    return saved


@pytest.fixture(scope="session")
def unet_models(tiny: TinyModels, folders: Path) -> tuple[object, object]:
    """(source, target) tiny UNet MODELs loaded by ComfyUI (diffusion-model files)."""
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(tiny.source_unet)), comfy.sd.load_diffusion_model(str(tiny.target_unet))


@pytest.fixture(scope="session")
def vega_models(tiny: TinyModels, folders: Path) -> tuple[object, object]:
    """(source, target) tiny SDXL-derivative (Segmind Vega-like) UNet MODELs."""
    import comfy.sd

    return (comfy.sd.load_diffusion_model(str(tiny.vega_source_unet)),
            comfy.sd.load_diffusion_model(str(tiny.vega_target_unet)))


@pytest.fixture(scope="session")
def target_checkpoint(tiny: TinyModels, folders: Path) -> tuple[object, object, object]:
    """(MODEL, CLIP, VAE) of the tiny fine-tune checkpoint."""
    import comfy.sd

    out = comfy.sd.load_checkpoint_guess_config(str(tiny.target_checkpoint), output_vae=True, output_clip=True)
    return out[0], out[1], out[2]


@pytest.fixture(scope="session")
def node_classes(folders: Path) -> dict[str, type]:
    """ComfyUI's registry of node classes (our five included)."""
    return comfy_nodes.NODE_CLASS_MAPPINGS
