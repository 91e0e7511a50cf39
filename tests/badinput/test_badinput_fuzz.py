"""Property-based fuzzing of both readers (LoRA and model) and of the numbers a LoRA can hold.

Every generated file must either read or fail with the project's own :class:`LoraxError`; no
other exception type may escape (issue 11 found ``TypeError``, ``RecursionError`` and
``ValueError`` here). A file our header check admits must also be admitted by ``safetensors``
itself, so the model reader (which reads tensors without safetensors) is never more permissive
than the format. About 1 100 cases in all (plus the 240 of tests/formats/test_formats_fuzz.py),
within ~40 s on the 2-core CI machine, 80 of them whole command-line runs. ``LORAX_FUZZ_SCALE``
multiplies every count for longer soak runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
from pathlib import Path

import torch
from _badinput_helpers import CHECKPOINT_KEY, KOHYA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save, save_file

from lorax_core.cli import main
from lorax_core.errors import FormatError, LoraxError
from lorax_core.formats import parse_lora, read_lora, write_lora
from lorax_core.formats.io import read_header
from lorax_core.library import EXIT_PARTIAL
from lorax_core.modelio import open_model
from lorax_core.transfer import transfer_adapter
from lorax_core.types import DictWeights, LoraFactors, TransferOptions

#: ``LORAX_FUZZ_SCALE=10`` runs every fuzzer ten times longer (a nightly or a local soak run).
FUZZ_SCALE = float(os.environ.get("LORAX_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    """Hypothesis settings of one fuzzer: no deadline (2 shared cores), no example database left behind."""
    return settings(
        max_examples=max(1, round(examples * FUZZ_SCALE)),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "U8": 1, "BOOL": 1, "F8_E4M3": 1}
NAMES = [f"{KOHYA}.lora_down.weight", f"{KOHYA}.lora_up.weight", f"{KOHYA}.alpha", "x", CHECKPOINT_KEY,
         "diffusion_model.y.weight", "", "__metadata__"]  # fmt: skip

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
_dtype = st.sampled_from(list(DTYPE_BYTES)) | st.sampled_from(["Q7", "f32", ""]) | _json
_dim = st.integers(0, 4) | st.integers(-3, -1) | st.integers(2**62, 2**66) | st.floats() | st.booleans() | _json
_shape = st.lists(st.integers(0, 4), max_size=3) | st.lists(_dim, max_size=10) | _json
_MUTATIONS = ["none"] * 8 + ["overlap", "gap", "repeat", "beyond", "negative", "reverse", "junk", "short"]


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    """A header of 0–4 entries, mostly well-formed, each possibly broken in one way, plus data bytes."""
    header: dict[str, object] = {}
    offset = 0
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(NAMES))
        dtype = draw(st.sampled_from(list(DTYPE_BYTES)) if draw(st.booleans()) else _dtype)
        shape = draw(st.lists(st.integers(0, 4), max_size=3) if draw(st.booleans()) else _shape)
        ints = isinstance(shape, list) and all(type(d) is int for d in shape)
        if ints and isinstance(dtype, str) and dtype in DTYPE_BYTES:
            size = math.prod(shape) * DTYPE_BYTES[dtype]
            size = size if 0 <= size < 4096 else 8
        else:
            size = draw(st.integers(0, 16))
        start, end = offset, offset + size
        how = draw(st.sampled_from(_MUTATIONS))
        if how == "overlap":
            start, end = max(0, start - 4), max(0, end - 4)
        elif how == "gap":
            start, end = start + 4, end + 4
        elif how == "repeat":
            start, end = 0, size
        elif how == "beyond":
            end += 10**6
        elif how == "negative":
            start = -start - 1
        elif how == "reverse":
            start, end = end, start
        offsets: object = draw(_json) if how == "junk" else ([start] if how == "short" else [start, end])
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        offset = max(offset, end if isinstance(end, int) and end < 10**5 else offset)
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2) | _json)
    raw = json.dumps(header).encode() + b" " * draw(st.integers(0, 7))
    data = draw(st.binary(min_size=offset, max_size=offset)) + b"\0" * draw(st.sampled_from([0, 0, 0, 1, 4]))
    return struct.pack("<Q", len(raw)) + raw + data


def _exercise(path: Path) -> None:
    """Both readers, every tensor, the fingerprint: only LoraxError may escape; admitted ⇒ safetensors admits."""
    try:
        entries, _ = read_header(path)
    except FormatError:
        entries = None
    try:
        read_lora(path)
    except LoraxError:
        pass
    try:
        model = open_model(path)
        for key in model.keys():
            try:
                model.get(key)
            except LoraxError:
                pass
        assert len(model.fingerprint) == 16
    except LoraxError:
        pass
    if entries is not None:
        with safe_open(str(path), framework="pt") as handle:
            for key in entries:
                handle.get_tensor(key)


@fuzz(350)
@given(blob=safetensors_files())
def test_generated_headers(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "gen.safetensors"
    path.write_bytes(blob)
    _exercise(path)


def _lora_bytes() -> bytes:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        f"{KOHYA}.lora_down.weight": torch.randn(2, 8, generator=gen),
        f"{KOHYA}.lora_up.weight": torch.randn(8, 2, generator=gen).to(torch.float16),
        f"{KOHYA}.alpha": torch.tensor(1.0),
        "lora_unet_conv.lora_down.weight": torch.randn(2, 4, 3, 3, generator=gen),
        "lora_unet_conv.lora_up.weight": torch.randn(8, 2, 1, 1, generator=gen),
    }
    return save(tensors, metadata={"ss_network_dim": "2"})


def _model_bytes() -> bytes:
    gen = torch.Generator().manual_seed(1)
    tensors = {
        CHECKPOINT_KEY: torch.randn(8, 8, generator=gen),
        "model.diffusion_model.conv.weight": torch.randn(8, 4, 3, 3, generator=gen).to(torch.bfloat16),
        "cond_stage_model.transformer.text_model.q.weight": torch.randn(4, 4, generator=gen).to(torch.float16),
        "first_stage_model.step": torch.tensor([3], dtype=torch.int64),
    }
    return save(tensors, metadata={"modelspec.architecture": "sd1"})


_edit = st.tuples(
    st.sampled_from(["flip", "set", "insert", "delete", "length"]),
    st.integers(0, 2**20),
    st.binary(min_size=1, max_size=6),
)


def _mutate(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    out = bytearray(data)
    for kind, pos, chunk in edits:
        i = pos % max(len(out), 1)
        if kind == "flip" and out:
            out[i] ^= 1 << (chunk[0] % 8)
        elif kind == "set" and out:
            out[i : i + len(chunk)] = chunk
        elif kind == "insert":
            out[i:i] = chunk
        elif kind == "delete":
            del out[i : i + len(chunk)]
        elif kind == "length" and len(out) >= 8:  # a header length that lies a little
            (n,) = struct.unpack("<Q", bytes(out[:8]))
            out[:8] = struct.pack("<Q", max(0, n + (pos % 17) - 8))
    return bytes(out)


@fuzz(250)
@given(edits=st.lists(_edit, min_size=1, max_size=4))
def test_mutated_lora_files(tmp_path: Path, edits: list[tuple[str, int, bytes]]) -> None:
    path = tmp_path / "lora.safetensors"
    path.write_bytes(_mutate(_LORA, edits))
    _exercise(path)


@fuzz(250)
@given(edits=st.lists(_edit, min_size=1, max_size=4))
def test_mutated_model_files(tmp_path: Path, edits: list[tuple[str, int, bytes]]) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(_mutate(_MODEL, edits))
    _exercise(path)


_LORA = _lora_bytes()
_MODEL = _model_bytes()

# ------------------------------------------------------------------ numbers inside a LoRA

_special = st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -1e30, 6e4, 1e-40, 0.0, 1.0, -2.5])
_WEIGHTS = None


def _weights() -> tuple[DictWeights, DictWeights]:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(16, 16, generator=gen)
    key = "diffusion_model.a.weight"
    return DictWeights({key: w}), DictWeights({key: w + 0.01 * torch.randn(16, 16, generator=gen)})


@fuzz(120)
@given(
    up_values=st.lists(_special, min_size=1, max_size=3),
    down_values=st.lists(_special, min_size=1, max_size=3),
    alpha=st.none() | _special,
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    method=st.sampled_from(["auto", "copy", "exact", "prolora", "project"]),
)
def test_special_values_never_reach_an_output(tmp_path: Path, up_values, down_values, alpha, dtype, method) -> None:
    """NaN, Inf and huge values in factors or alpha: a skipped layer or a LoraxError, never a non-finite file."""
    gen = torch.Generator().manual_seed(3)
    up, down = torch.randn(16, 2, generator=gen), torch.randn(2, 16, generator=gen)
    up.view(-1)[: len(up_values)] = torch.tensor(up_values)
    down.view(-1)[: len(down_values)] = torch.tensor(down_values)
    tensors = {"diffusion_model.a.lora_up.weight": up.to(dtype), "diffusion_model.a.lora_down.weight": down.to(dtype)}
    if alpha is not None:
        tensors["diffusion_model.a.alpha"] = torch.tensor(alpha)
    source, target = _weights()
    out = tmp_path / "out.safetensors"
    try:
        lora = parse_lora(tensors)
        if not lora.layers:
            assert lora.unsupported, "a refused layer must be reported with its reason"
            return
        (layer,) = lora.layers.values()
        result = transfer_adapter(
            {"diffusion_model.a.weight": layer},
            source,
            target,
            TransferOptions(method=method, rank=4, threshold=0.0),
        )
        json.loads(result.report.to_json(), parse_constant=_no_constant)
        write_lora(out, {"diffusion_model.a": result.layers["diffusion_model.a.weight"]}, style="kohya", overwrite=True)
    except LoraxError:
        return
    with safe_open(str(out), framework="pt") as handle:
        for key in handle.keys():
            assert bool(torch.isfinite(handle.get_tensor(key).to(torch.float32)).all()), key


@fuzz(80)
@given(
    which=st.sampled_from(["lora", "lora", "source", "target"]),
    edits=st.lists(_edit, min_size=1, max_size=3),
    command=st.sampled_from(["transfer", "transfer", "similarity", "inspect"]),
    method=st.sampled_from(["auto", "copy", "exact", "prolora"]),
)
def test_whole_cli_on_mutated_files(files, which, edits, command, method) -> None:
    """The command line on a damaged input: exit 0 or 2 and no exception; a failure leaves no output."""
    inputs = {"lora": files.lora, "source": files.source, "target": files.target}
    damaged = files.dir / f"damaged-{which}.safetensors"
    damaged.write_bytes(_mutate(inputs[which].read_bytes(), edits))
    inputs[which] = damaged
    out_dir = files.dir / "out"
    out_dir.mkdir(exist_ok=True)
    for p in out_dir.iterdir():
        p.unlink()
    if command == "inspect":
        argv = ["inspect", str(damaged)]
    elif command == "similarity":
        argv = ["similarity", "--quiet", "--no-cache", "--rank", "16", "--source", str(inputs["source"]),
                "--target", str(inputs["target"]), "--lora", str(inputs["lora"]), "--json", str(out_dir / "s.json")]  # fmt: skip
    else:
        argv = ["transfer", "--quiet", "--no-cache", "--rank", "16", "--method", method, "--source",
                str(inputs["source"]), "--target", str(inputs["target"]), "--lora", str(inputs["lora"]),
                "--out", str(out_dir / "o.safetensors"), "--report", str(out_dir / "r.json")]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        status = main(argv)
    assert status in (0, 2, EXIT_PARTIAL), err.getvalue()
    written = sorted(p.name for p in out_dir.iterdir())
    if status == 2:
        assert err.getvalue().count("\n") == 1 and written == [], (err.getvalue(), written)
    elif command == "transfer":
        assert written == ["o.safetensors", "r.json"]
        json.loads((out_dir / "r.json").read_text(), parse_constant=_no_constant)
        with safe_open(str(out_dir / "o.safetensors"), framework="pt") as handle:
            for key in handle.keys():
                assert bool(torch.isfinite(handle.get_tensor(key).to(torch.float32)).all()), key


def _no_constant(token: str) -> object:
    raise AssertionError(f"the report holds {token}, which is not JSON")


def test_fixture_files_are_valid(tmp_path: Path) -> None:
    """The seeds of the mutation fuzzers read cleanly (so the fuzzers start from real files)."""
    (tmp_path / "l.safetensors").write_bytes(_LORA)
    (tmp_path / "m.safetensors").write_bytes(_MODEL)
    assert len(read_lora(tmp_path / "l.safetensors").layers) == 2
    assert len(open_model(tmp_path / "m.safetensors")) == 4
    save_file({"a": torch.ones(1)}, str(tmp_path / "a.safetensors"))
    assert isinstance(LoraFactors(up=torch.ones(2, 1), down=torch.ones(1, 2)), LoraFactors)
