"""What a Kubernetes replica relies on under load, through bench/serve_load.py with a tiny model:
past ``--max-queue`` every refusal is a 503 with Retry-After and every accepted pair is recorded
exactly once; a SIGTERM during load (what a scale-down or a rollout sends) drops no request that
was sent before it, and the service exits 0. The figures it prints are the benchmark's; only the
checks are asserted here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_overload_and_sigterm_lose_no_accepted_request(tmp_path: Path) -> None:
    env = {**os.environ, "SIM_BENCH_DIR": str(tmp_path), "SIM_BENCH_MODEL_SHAPE": "tiny"}
    done = subprocess.run(
        [sys.executable, "-m", "bench.serve_load", "--parts", "overload,sigterm", "--seconds",
         "2", "--overload-users", "12", "--max-queue", "2", "--sigterm-after", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "FAILED" not in out, out
    for line in ("every 503 has Retry-After: ok",
                 "every accepted request has its answer: ok", "0 duplicated, 0 lost",
                 "exit status 0 ok"):
        assert line in out, out
    refused = next(line for line in out.splitlines() if "refused 503" in line)
    assert " refused 503 0," not in refused, out  # the overload run did overload
    before = next(line for line in out.splitlines() if "sent before SIGTERM" in line)
    assert "in flight at SIGTERM 0," not in before, out  # the signal came during load
