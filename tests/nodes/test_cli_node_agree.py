"""One pipeline (issue 9): the Transfer + Save nodes and the command line write the same LoRA.

Same source, target and LoRA files, same options: the node (target loaded by ComfyUI, weights
read through its ModelPatcher) and ``python -m lorax_core transfer`` (every model read from its
file) must write the same tensor names, the same values (to float32 round-off: ComfyUI hands
the node the target in its compute dtype) and the same metadata keys, keeping the source LoRA's
own training metadata in both.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from comfy_harness import pack_module
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.comfy

RANK, THRESHOLD = 320, 0.5
# Training metadata a kohya LoRA carries: kept (trigger words, base model) or dropped (its own
# network dim / hash, which would be wrong for the output).
SOURCE_META = {
    "ss_output_name": "agree_style",
    "modelspec.trigger_phrase": "lrx style",
    "ss_base_model_version": "sd_v1",
    "ss_network_dim": "8",
    "sshs_model_hash": "0123456789abcdef",
}


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def test_node_and_cli_write_the_same_lora(tiny, unet_models, folders, tmp_path):
    lora_path = Path(folders) / "agree_lora.safetensors"
    save_file(load_file(str(tiny.lora)), str(lora_path), metadata=SOURCE_META)

    # The node path: Load Source Model → Transfer LoRA → Save Transferred LoRA.
    _, target = unet_models
    source = pack_module("nodes.load").LoraXLoadSourceModel.execute(tiny.source_unet.name).result[0]
    transfer = pack_module("nodes.transfer").LoraXTransferLoRA
    lora = transfer.execute(source=source, target=target, lora_name=lora_path.name, method="auto", rank=RANK,
                            threshold=THRESHOLD, use_cache=False).result[0]
    saved = pack_module("nodes.save").LoraXSaveTransferredLoRA.execute(lora=lora, file_name="agree").result[0]
    node_tensors, node_meta = _read(Path(folders) / saved)

    # The command line on the same files.
    cli = pack_module("lorax_core.cli")
    out = tmp_path / "agree_cli.safetensors"
    argv = ["transfer", "--quiet", "--no-cache", "--source", str(tiny.source_unet), "--target", str(tiny.target_unet),
            "--lora", str(lora_path), "--out", str(out), "--rank", str(RANK), "--threshold", str(THRESHOLD)]
    # Partial (exit status 3): diffusers-named layers need --comfyui on the command line.
    assert cli.main(argv) == pack_module("lorax_core.library").EXIT_PARTIAL
    cli_tensors, cli_meta = _read(out)

    assert set(node_tensors) == set(cli_tensors) and len(node_tensors) > 0
    for name, value in cli_tensors.items():
        assert node_tensors[name].dtype == value.dtype, name
        torch.testing.assert_close(node_tensors[name].float(), value.float(), rtol=2e-3, atol=2e-5, msg=name)

    assert set(node_meta) == set(cli_meta)
    for key in ("modelspec.trigger_phrase", "ss_output_name", "ss_base_model_version"):
        assert node_meta[key] == cli_meta[key] == SOURCE_META[key]
    for key in ("ss_network_dim", "sshs_model_hash"):
        assert key not in node_meta
    same = ("lorax.method", "lorax.rank", "lorax.threshold", "lorax.output_rank", "lorax.source_format",
            "lorax.source_fingerprint", "lorax.transferred", "lorax.skipped", "lorax.tool_version")
    assert {k: node_meta[k] for k in same} == {k: cli_meta[k] for k in same}
    assert node_meta["lorax.source_lora"] == cli_meta["lorax.source_lora"] == lora_path.name
    # The target is the same model: its fingerprint differs (a file vs a loaded MODEL), its family does not.
    assert node_meta["lorax.source_family"] == "SD15"
    assert node_meta["lorax.host"].startswith("ComfyUI node pack") and cli_meta["lorax.host"].startswith("command line")
