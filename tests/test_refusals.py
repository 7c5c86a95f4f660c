"""An input that cannot be planned is refused in one sentence before any model load, network or
database work: the database here is a closed port and the model a name no hub is asked for, so
a refusal that reached either would say so, and take longer. The bound is loose (5 s: a busy
test machine); ``bench/refusals.py`` prints the figures."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.refusals import BAD_INPUTS
from tests.conftest import _closed_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kind", BAD_INPUTS)
@pytest.mark.parametrize("command", ["score", "fetch"])
def test_an_input_of_the_wrong_shape_is_refused_at_once(
        tmp_path: Path, kind: str, command: str) -> None:
    source = tmp_path / "input.csv"
    source.write_bytes(BAD_INPUTS[kind])
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "sim_pipeline.cli", command, str(source), "--store",
         str(tmp_path / "store"), "--model", "no-such-org/no-such-model", "--database-url",
         f"postgresql://postgres@127.0.0.1:{_closed_port()}/refusals"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    seconds = time.monotonic() - started
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert str(source) in lines[0] or "column" in lines[0], lines[0]
    assert "database" not in lines[0] and "model" not in lines[0]
    assert seconds < 5, f"refused after {seconds:.1f} s"
    assert not (tmp_path / "store").exists(), "nothing was written before the refusal"
