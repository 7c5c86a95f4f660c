"""`sim-pipeline doctor` measures every precision and backend here, beside the flags' choice.

Tiny random-weight checkpoint: the figures are meaningless as speeds; what is checked is that
each option ran on the same images and its embeddings were compared against fp32's.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sim_pipeline import cli
from sim_pipeline.stages.embed.cpu import int8_weight_type
from sim_pipeline.stages.embed.model import resolved_precision

LINE = re.compile(r"^  (\S+)\s+([\d.]+) images/s   cosine vs fp32 min ([\d.]+)$")


def test_doctor_measures_each_precision_and_backend(
        tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["doctor", "--model", str(tiny_model), "--store", str(tmp_path / "store"),
                     "--device", "cpu", "--images", "4", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("CPU: ") and "flags: " in out.splitlines()[0]
    picked = resolved_precision("cpu", "auto", str(tiny_model))
    assert f"auto picks: device cpu, precision {picked}" in out
    measured = {m[1]: (float(m[2]), float(m[3]))
                for m in (LINE.match(line) for line in out.splitlines()) if m}
    assert set(measured) == {"fp32", "bf16", "onnx", "onnx-int8"}
    assert measured["fp32"][1] == 1.0, "fp32 is the reference"
    assert all(rate > 0 and 0.99 <= cosine <= 1.0 for rate, cosine in measured.values())
    assert measured["bf16"][1] < 1.0 and measured["onnx-int8"][1] < 1.0, "each really ran"
    assert f"onnx-int8 weights here: {int8_weight_type()} " in out
