"""The command line in-process (``cli.main``): every error path's exit code and message, styles, inspect."""

from __future__ import annotations

import json
import pathlib
import re

import pytest
import torch
from make_fixtures import WIDTH, kohya_lora, one_error_line, sd_checkpoint, transfer_argv
from safetensors.torch import save_file

from lorax_core.cli import main
from lorax_core.formats import read_lora, write_lora
from lorax_core.library import EXIT_PARTIAL
from lorax_core.types import LoraXFactors

transfer_args, error_line = transfer_argv, one_error_line


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["transfer", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--source",
        "--target",
        "--lora",
        "--out",
        "--method",
        "--rank",
        "--threshold",
        "--report",
        "--comfyui",
        "--device",
        "--overwrite",
        "--style",
    ):
        assert flag in text


def test_wrong_format_model_as_lora(files, capsys):
    assert main(transfer_args(files, **{"--lora": files.source})) == 2
    assert error_line(capsys).startswith(
        f"lorax_core transfer: error: {files.source}: not a LoRA file in any format we read (tried lorax, kohya, comfy, peft)"
    )


def test_corrupt_safetensors(files, capsys):
    data = files.lora.read_bytes()
    files.lora.write_bytes(data[:-100])  # header intact, tensor bytes cut short
    assert main(transfer_args(files)) == 2
    assert re.match(
        re.escape(f"lorax_core transfer: error: {files.lora}: truncated or corrupt: tensor"), error_line(capsys)
    )


def test_pickle_refused(files, capsys):
    ckpt = files.dir / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04K\x01.")
    assert main(transfer_args(files, **{"--source": ckpt})) == 2
    assert error_line(capsys).startswith(
        f"lorax_core transfer: error: {ckpt}: .ckpt files are Python pickles, and loading one runs any code"
    )


def test_shape_mismatch(files, capsys):
    wide = {k: torch.cat([v, v], dim=0) if k.endswith("lora_up.weight") else v for k, v in kohya_lora().items()}
    save_file(wide, str(files.lora))
    assert main(transfer_args(files)) == 2
    line = error_line(capsys)
    assert line.startswith(
        f"lorax_core transfer: error: {files.lora}: no layer fits {files.source} (9 shape mismatches"
    )
    assert f"the LoRA layer is {2 * WIDTH}×{WIDTH} but the source weight is {WIDTH}×{WIDTH}" in line
    assert line.endswith("Use the model it was trained on as the source model.")


def test_nothing_transferable_unsupported_only(files, capsys):
    save_file({"lora_unet_input_blocks_1_1_proj_in.hada_w1_a": torch.ones(2, 2)}, str(files.lora))
    assert main(transfer_args(files)) == 2
    assert error_line(capsys) == (
        f"lorax_core transfer: error: {files.lora}: none of its 1 layers is a transferable LoRA layer "
        "(1× incomplete LoHa layer: hada_w1_b, hada_w2_a, hada_w2_b missing; not transferable)."
    )


def test_nothing_transferable_unrelated_target(files, capsys):
    save_file(sd_checkpoint(99), str(files.target))  # same shapes, unrelated subspaces
    assert main(transfer_args(files, **{"--threshold": 0.9})) == 2
    line = error_line(capsys)
    assert line.startswith("lorax_core transfer: error: none of the 9 layers was transferred")
    assert not (files.dir / "out.safetensors").exists()


def test_diffusers_names_need_comfyui(files, capsys):
    lora = {f"lora_unet_down_blocks_0_attentions_0_proj_in.{s}": t for s, t in
            (("lora_down.weight", torch.ones(2, WIDTH)), ("lora_up.weight", torch.ones(WIDTH, 2)))}  # fmt: skip
    save_file(lora, str(files.lora))
    assert main(transfer_args(files)) == 2
    line = error_line(capsys)
    assert "diffusers-style block name" in line and "pass --comfyui PATH" in line


def test_bad_comfyui_path(files, capsys):
    assert main(transfer_args(files, **{"--comfyui": files.dir})) == 2
    assert error_line(capsys) == (
        f"lorax_core transfer: error: --comfyui {files.dir.resolve()}: not a ComfyUI install (no comfy/lora.py there); "
        "pass ComfyUI's root folder."
    )


def test_output_exists_unless_overwrite(files, capsys):
    (files.dir / "out.safetensors").write_bytes(b"keep me")
    assert main(transfer_args(files)) == 2
    assert error_line(capsys) == (
        f"lorax_core transfer: error: {files.dir / 'out.safetensors'}: the file already exists; "
        "choose another name or pass --overwrite."
    )
    assert (files.dir / "out.safetensors").read_bytes() == b"keep me"
    assert main([*transfer_args(files), "--overwrite"]) == 0
    assert len(read_lora(files.dir / "out.safetensors").layers) == 9


def test_bad_option_value(files, capsys):
    assert main(transfer_args(files, **{"--threshold": 1.5})) == 2
    assert error_line(capsys) == (
        "lorax_core transfer: error: threshold must be in [0, 1] (0 = chance level, 1 = identical subspaces); got 1.5."
    )


def test_identical_target_keeps_delta_and_comfy_style(files):
    assert main(transfer_args(files, **{"--target": files.source, "--method": "exact", "--style": "comfy"})) == 0
    out = read_lora(files.dir / "out.safetensors")
    src = read_lora(files.lora)
    assert out.format == "comfy"
    name = "diffusion_model.input_blocks.1.0.in_layers.2"
    got, want = out.layers[name], src.layers["lora_unet_input_blocks_1_0_in_layers_2"]
    assert got.kernel == want.kernel == (WIDTH, 3, 3)
    dw = lambda f: f.scale * (f.up2d().double() @ f.down2d().double())  # noqa: E731
    torch.testing.assert_close(dw(got), dw(want), rtol=1e-4, atol=1e-5)


def test_peft_source_stays_peft(files):
    src = read_lora(files.lora)
    peft = {"unet." + n.removeprefix("lora_unet_").replace("_", ".").replace("input.blocks", "input_blocks")
            .replace("in.layers", "in_layers").replace("proj.in", "proj_in"): f
            for n, f in src.layers.items() if n in ("lora_unet_input_blocks_1_1_proj_in", "lora_unet_input_blocks_1_0_in_layers_2")}  # fmt: skip
    write_lora(files.lora, peft, style="peft", overwrite=True)
    assert main(transfer_args(files)) == 0
    out = read_lora(files.dir / "out.safetensors")
    assert out.format == "peft"
    assert set(out.layers) == {"unet.input_blocks.1.1.proj_in", "unet.input_blocks.1.0.in_layers.2"}


def test_lorax_source_is_written_as_lora(files):
    core = {"diffusion_model.input_blocks.1.1.proj_in": LoraXFactors(core=torch.randn(8), shape=(WIDTH, WIDTH, 1, 1))}
    write_lora(files.lora, core, overwrite=True)
    assert main(transfer_args(files, **{"--method": "lorax"})) == 0
    out = read_lora(files.dir / "out.safetensors")
    assert out.format == "comfy"
    assert list(out.layers) == ["diffusion_model.input_blocks.1.1.proj_in"]


def test_similarity_all_common_weights(files, capsys):
    assert main(["similarity", "--quiet", "--no-cache", "--source", str(files.source), "--target", str(files.target),
                 "--rank", "8"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "10 of 10 layers pass."  # 8 UNet weights + 1 text encoder + the VAE conv


def test_inspect_model_json(files, capsys):
    assert main(["inspect", "--json", str(files.source)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "model (full checkpoint)"
    assert info["text encoders"] == "clip_l"
    assert info["diffusion model weights"] == 16
    assert len(info["fingerprint"]) == 16


def test_inspect_counts_lycoris_layers_by_type_not_by_their_factored_rank(capsys):
    # LoHa's exact factors have rank r1·r2 and LoKr's a Kronecker rank: as "ranks" they would be
    # nonsense, so inspect counts such layers by type and keeps ranks/alphas for LoRA pairs.
    golden = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "golden" / "lycoris_mixed.safetensors"
    assert main(["inspect", "--json", str(golden)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["adapter types"] == {"full": 1, "loha": 1, "lokr": 1, "lora": 2, "lora+dora": 1}
    assert info["ranks"] == {"2": 3} and info["alphas"] == {"none": 3} and info["not transferable"] == {}


def test_partial_transfer_warns_on_stderr_exits_3_and_strict_refuses(files, capsys):
    """Issue 20: a partial transfer has its own exit status (3), which scripts can see."""
    tensors = {**kohya_lora(), "lora_unet_input_blocks_1_1_proj_in.hada_w1_a": torch.ones(2, 2)}
    save_file(tensors, str(files.lora))
    assert main(transfer_args(files)) == EXIT_PARTIAL
    assert (files.dir / "out.safetensors").exists()
    captured = capsys.readouterr()
    assert "WARNING: 1 of 9 layers were NOT transferred" in captured.out
    assert captured.err == (
        "lorax transfer: WARNING: 1 of 9 layers were not transferred (reasons above and in the report); "
        "pass --strict to make this an error.\n"
    )
    assert main([*transfer_args(files, out="strict.safetensors"), "--strict"]) == 2
    assert "strict" in error_line(capsys)
    assert not (files.dir / "strict.safetensors").exists()


def test_progress_lines_when_stderr_is_a_log(files, capsys, monkeypatch):
    """Issue 12 item 6: piped to a log, a transfer still shows progress, as whole lines."""
    import lorax_core.cli as cli

    monkeypatch.setattr(cli, "LOG_PROGRESS_INTERVAL_S", 0.0)
    argv = [a for a in transfer_args(files) if a != "--quiet"]
    assert main(argv) == 0
    err = capsys.readouterr().err  # capsys's stderr is not a terminal
    lines = [line for line in err.splitlines() if line.startswith("lorax_core: transfer: ")]
    assert "\r" not in err
    assert lines, err
    assert re.fullmatch(r"lorax_core: transfer: (\d+)/\1 layers \(100%\), .*", lines[-1]), lines[-1]
    # --quiet silences it.
    assert main([*argv, "--quiet", "--overwrite"]) == 0
    assert "lorax_core: transfer:" not in capsys.readouterr().err


def test_no_progress_lines_for_a_short_run_in_a_log(files, capsys):
    """Below the interval nothing is printed: a quick run's log holds only the summary and warnings."""
    argv = [a for a in transfer_args(files) if a != "--quiet"]
    assert main(argv) == 0
    assert "lorax_core: transfer:" not in capsys.readouterr().err
