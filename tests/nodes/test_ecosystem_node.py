"""Issue 12 items 1–3 in the node path: LoRAs written by diffusers/PEFT transfer fully inside ComfyUI.

The files are the ones ``tests/formats/test_ecosystem.py`` makes with the real tools (diffusers'
``save_lora_weights`` with ``lora_adapter_metadata``, transformers-5 text-encoder names; a
``PeftModel`` state dict with ``base_model.model.``/``.default``) for the tiny SD1.5 models.
The Transfer node resolves them with ComfyUI's live key map (which spells attention layers only as
``…processor.to_q``) and must move every layer, at the scale diffusers applies.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from comfy_harness import pack_module

# The real-tool file writers live with the formats tier (as tests/badinput puts tests/fixtures on the path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "formats"))
from _ecosystem_helpers import RANK, UNET_ALPHA, write_ecosystem_files

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def ecosystem(folders) -> dict[str, str]:
    """The real-tool LoRAs, copied into ComfyUI's loras folder under distinct names."""
    paths = write_ecosystem_files()
    names = {}
    for name in ("pipeline_meta", "peft_model"):
        dest = Path(folders) / f"ecosystem_{name}.safetensors"
        shutil.copyfile(paths[name], dest)
        names[name] = dest.name
    return names


def _transfer(tiny, model, clip, lora_name: str):
    load = pack_module("nodes.load").LoraXLoadSourceModel
    node = pack_module("nodes.transfer").LoraXTransferLoRA
    source = load.execute(tiny.source_checkpoint.name).result[0]
    return node.execute(source=source, target=model, lora_name=lora_name, method="auto", rank=320, threshold=0.5,
                        use_cache=False, target_clip=clip).result[0]  # fmt: skip


def test_diffusers_pipeline_file_with_metadata_transfers_every_layer(tiny, target_checkpoint, ecosystem):
    model, clip, _ = target_checkpoint
    lora = _transfer(tiny, model, clip, ecosystem["pipeline_meta"])
    report = lora.report
    assert not report.skipped, [(r.key, r.reason) for r in report.skipped]
    assert len(report.transferred) == 60
    assert sum(k.startswith("text_encoders.") for k in lora.factors) == 12  # transformers-5 names resolved
    # The node reads the file at diffusers' scale lora_alpha / r (0.5 for the UNet), not ComfyUI's 1.
    read = pack_module("nodes._host").load_lora_file(ecosystem["pipeline_meta"], None)
    unet = [layer for name, layer in read.layers.items() if name.startswith("unet.")]
    assert unet and all(layer.scale == pytest.approx(UNET_ALPHA / RANK) for layer in unet)


def test_peft_model_state_dict_transfers_every_unet_layer(tiny, target_checkpoint, ecosystem):
    model, clip, _ = target_checkpoint
    report = _transfer(tiny, model, clip, ecosystem["peft_model"]).report
    assert not report.skipped, [(r.key, r.reason) for r in report.skipped]
    assert len(report.transferred) == 48
