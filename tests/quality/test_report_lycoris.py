"""The generated "LyCORIS adapters: auto vs copy" table reads each cell against copy and the LoRAs' verdict."""

from __future__ import annotations

from typing import Any

from benchmarks.quality.report import _lycoris_summary


def _score(style: float, se: float = 0.01, **info: Any) -> dict[str, Any]:
    return {"style": style, "style_se": se, **info}


def _entry(style: str, kind: str, copy: float, auto: float, **auto_info: Any) -> dict[str, Any]:
    return {"style": style, "kind": kind, "methods": {"none": _score(0.0), "copy": _score(copy),
                                                      "auto": _score(auto, **auto_info)}}  # fmt: skip


def _doc() -> dict[str, Any]:
    written = {"written_as": {"loha": 24, "lora": 80}}
    return {"targets": {
        # LoRAs at least copy (= and ▲): the LyCORIS adapters must be too
        "finetuned": {"adapters": {
            "palette/lora_r8": _entry("palette", "lora", 0.50, 0.51),
            "palette/lora_r16": _entry("palette", "lora", 0.50, 0.70),
            "palette/lorax_R16": _entry("palette", "lorax", 0.50, 0.10),  # not a LoRA: not in the verdict
            "palette/loha_r4": _entry("palette", "loha", 0.50, 0.80, **written),
            "palette/lokr": _entry("palette", "lokr", 0.50, 0.20, written_as={"lokr": 24, "lora": 80}),
        }},
        # a LoRA below copy: no target for the LyCORIS adapters there
        "unrelated": {"adapters": {
            "palette/lora_r8": _entry("palette", "lora", 0.50, 0.05, refused=True),
            "palette/loha_r4": _entry("palette", "loha", 0.50, 0.05, refused=True),
        }},
    }}  # fmt: skip


def test_rows_say_auto_vs_copy_and_the_verdict() -> None:
    lines = _lycoris_summary(_doc())
    assert lines[0] == "### LyCORIS adapters: auto vs copy"
    rows = [line for line in lines if line.startswith("| finetuned") or line.startswith("| unrelated")]
    assert rows == [
        "| finetuned | palette | loha_r4 | 0.80 ± 0.02 | 0.50 ± 0.02 | ▲ | loha 24, lora 80 "
        "| lora_r8 = lora_r16 ▲ | met |",
        "| finetuned | palette | lokr | 0.20 ± 0.02 | 0.50 ± 0.02 | ▼ | lokr 24, lora 80 "
        "| lora_r8 = lora_r16 ▲ | missed |",
        "| unrelated | palette | loha_r4 | 0.05 ± 0.02 | 0.50 ± 0.02 | ▼ | refused | lora_r8 ▼ "
        "| – (LoRAs below copy too) |",
    ]


def test_no_lycoris_adapters_no_table() -> None:
    doc = {"targets": {"finetuned": {"adapters": {"palette/lora_r8": _entry("palette", "lora", 0.5, 0.5)}}}}
    assert _lycoris_summary(doc) == []
