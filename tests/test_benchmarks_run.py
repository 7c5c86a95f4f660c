"""The benchmark scripts stay runnable: each runs end to end on a tiny model and small N.

They print figures; nothing here times anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("module", "args", "expect"), [
    ("bench.gpu", ["--images", "6", "--batch-size", "4", "--rounds", "1"], "stage/bare"),
    ("bench.embed", ["--images", "6", "--batch-size", "4", "--rounds", "1", "--onnx"],
     "cpu onnx-int8: embed stage"),
    ("bench.end_to_end", ["--pairs", "12", "--images", "8", "--repeat", "2"],
     "over 2 rounds: cold / bare median"),
    ("bench.spark", ["--pairs", "12", "--images", "8", "--timeline"],
     "rows identical: True"),  # one round: each starts Spark's JVMs anew (a minute and more)
    ("bench.airflow", ["--pairs", "200", "--images", "20", "--chunk-sizes", "100"],
     "critical path"),  # printed after "airflow / cli", with where the run's time went
    ("bench.cache", ["--pairs", "20", "--images", "20"], "second / first inference time"),
    ("bench.memory", ["--small", "20", "--large", "60", "--images", "5"], "large / small"),
    ("bench.hostile_images", ["--counts", "1", "3", "--side", "1500"], "most / fewest images"),
    ("bench.refusals", ["--rounds", "1"], "/ start-up"),
])
def test_benchmark_script_runs(tmp_path: Path, module: str, args: list[str], expect: str) -> None:
    env = {**os.environ, "SIM_BENCH_DIR": str(tmp_path), "SIM_BENCH_MODEL_SHAPE": "tiny"}
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert expect in done.stdout
