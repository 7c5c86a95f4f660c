"""What a task's log says about its stage: a line every so often while it runs, one at the end.

A chunk's embedding can take many minutes and the library logs nothing meanwhile, so a
background thread writes "still running" lines (every ``SIM_PIPELINE_PROGRESS_SECONDS``, default
30 s) and the task ends with one human sentence: rows, seconds, rows per second and the stage's
counts, instead of a raw dict. The library stays free of Airflow: this wraps its calls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from sim_airflow.options import progress_seconds

log = logging.getLogger(__name__)


@contextmanager
def progress_lines(what: str) -> Iterator[None]:
    """Log ``<what>: still running after N s`` every ``SIM_PIPELINE_PROGRESS_SECONDS`` until the
    block ends."""
    interval = progress_seconds()
    started, done = time.monotonic(), threading.Event()

    def report() -> None:
        while not done.wait(interval):
            log.info("%s: still running after %.0f s.", what, time.monotonic() - started)

    reporter = threading.Thread(target=report, name="sim-pipeline-progress", daemon=True)
    reporter.start()
    try:
        yield
    finally:
        done.set()
        reporter.join()


def describe_counts(counts: Mapping[str, Any]) -> str:
    """``ok 9, attempted 10, errors http_404 1``: the non-zero counts, in the stage's order."""
    parts = []
    for name, value in counts.items():
        if name.startswith("latency"):
            continue  # a histogram reads badly in one line
        if isinstance(value, Mapping) and value:
            parts.append(f"{name} " + ", ".join(f"{k} {v}" for k, v in value.items()))
        elif isinstance(value, int) and not isinstance(value, bool) and value:
            parts.append(f"{name} {value}")
    return ", ".join(parts) or "nothing to do"


def summary(what: str, rows: int, seconds: float, counts: Mapping[str, Any]) -> str:
    """``fetch-images, chunk 3: rows 3000-3999: 1000 rows in 12.1 s (83 rows/s); ok 990, ...``"""
    rate = rows / seconds if seconds > 0 else 0.0
    return f"{what}: {rows} rows in {seconds:.1f} s ({rate:.0f} rows/s); {describe_counts(counts)}."
