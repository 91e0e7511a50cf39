"""Issue 21 item 4 (iii): a LoKr and a DoRA file made by lycoris-lora transfer in the node path of a real ComfyUI.

The Transfer node reads them from ComfyUI's loras folder, moves every layer to the fine-tuned
tiny SD1.5 target, and the resulting ``LORA_MODEL`` loads in the pack's apply node and in stock
``LoraModelLoader`` with no key left unloaded; the DoRA output keeps its (re-derived) magnitude.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from comfy_harness import pack_module

# The real-tool file writers live with the formats tier (as tests/nodes/test_ecosystem_node.py does).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "formats"))
from _lycoris_helpers import LAYERS, make_lycoris_file

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def lycoris_files(tiny, folders) -> dict[str, str]:
    return {kind: make_lycoris_file(kind, tiny.source_checkpoint, Path(folders) / f"lycoris_{kind}.safetensors").name
            for kind in ("lokr_factored", "dora")}  # fmt: skip


def _transfer(tiny, model, lora_name: str):
    load = pack_module("nodes.load").LoraXLoadSourceModel
    node = pack_module("nodes.transfer").LoraXTransferLoRA
    source = load.execute(tiny.source_checkpoint.name).result[0]
    return node.execute(source=source, target=model, lora_name=lora_name, method="auto", rank=16, threshold=0.5,
                        use_cache=False).result[0]  # fmt: skip


@pytest.mark.parametrize("kind", ["lokr_factored", "dora"])
def test_lycoris_file_transfers_and_loads_in_stock_comfyui(tiny, target_checkpoint, lycoris_files, caplog, kind):
    from comfy_extras.nodes_train import LoraModelLoader

    model, _, _ = target_checkpoint
    lora = _transfer(tiny, model, lycoris_files[kind])
    report = lora.report
    assert not report.skipped, [(r.key, r.reason) for r in report.skipped]
    assert len(report.transferred) == len(LAYERS)
    assert all(r.written_as for r in report.transferred)
    if kind == "dora":
        assert sum(k.endswith(".dora_scale") for k in lora) == len(LAYERS)
        assert {r.written_as for r in report.transferred} == {"lora+dora"}
    else:
        assert {r.written_as for r in report.transferred} <= {"lokr", "lora"}
    apply = pack_module("nodes.apply").LoraXApplyTransferredLoRA
    patched = apply.execute(model=model, lora=lora, strength_model=1.0, strength_clip=1.0).result[0]
    assert set(patched.patches) == set(lora.factors)
    with caplog.at_level(logging.WARNING):
        stock = LoraModelLoader.execute(model=model, lora=lora, strength_model=1.0).result[0]
    assert set(stock.patches) == set(lora.factors)
    assert "lora key not loaded" not in caplog.text
    assert all(torch.isfinite(t).all() for t in lora.values())


def test_refine_refuses_dora_layers_by_name():
    """A transferred DoRA layer is not an additive update: refinement says so instead of dropping the magnitude."""
    host, refine = pack_module("nodes._host"), pack_module("nodes._refine_host")
    lycoris, errors = pack_module("lorax_core.lycoris"), pack_module("lorax_core.errors")
    transferred = host.TransferredLora()
    key = "diffusion_model.input_blocks.1.1.proj_in.weight"
    transferred.factors = {
        key: lycoris.LycorisLayer(up=torch.ones(4, 1), down=torch.ones(1, 4), kind="lora", dora_scale=torch.ones(4, 1))
    }
    with pytest.raises(errors.FormatError) as raised:
        refine.refinable_layers(transferred, None)
    assert str(raised.value) == (
        f"{key} and 0 other transferred layers carry a DoRA magnitude; refinement distils additive LoRA updates only. "
        "Use the Transfer LoRA result as it is, or transfer a LoRA without DoRA."
    )
