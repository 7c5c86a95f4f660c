"""The in-process runner: every stage over every chunk, for the CLI and one-off files.

Airflow runs the same stage functions as mapped tasks instead; this module is only the loop.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sim_pipeline.core.config import Settings
from sim_pipeline.core.layout import FETCH_IMAGES, JOIN_SCORE
from sim_pipeline.results.report import report_path
from sim_pipeline.runners.lifecycle import Run
from sim_pipeline.stages.embed.model import release_encoders
from sim_pipeline.stages.fetch.records import FetchStats
from sim_pipeline.stages.finalize import default_output_path
from sim_pipeline.stages.plan import RunPlan, check_input_file
from sim_pipeline.stages.registry import CHUNK_STAGES
from sim_pipeline.stages.score import ScoredRow


@dataclass
class RunSummary:
    run_id: str
    output: Path
    database: str
    rows: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    fetch: FetchStats = field(default_factory=FetchStats)
    seconds: float = 0.0
    repaired: Counter[str] = field(default_factory=Counter)  # damaged objects recomputed

    def add(self, scored: list[ScoredRow]) -> None:
        self.rows += len(scored)
        self.ok += sum(1 for s in scored if s.error is None)
        self.errors.update(s.error for s in scored if s.error)

    def render(self) -> str:
        errors = ", ".join(f"{code} {n}" for code, n in sorted(self.errors.items())) or "none"
        rate = self.rows / self.seconds if self.seconds else 0.0
        return "\n".join([
            f"run       {self.run_id}",
            f"rows      {self.rows}: {self.ok} scored, {self.rows - self.ok} errors",
            f"errors    {errors}",
            self.images_line(),
            *self.repairs_line(),
            f"time      {self.seconds:.1f} s ({rate:.1f} rows/s)",
            f"output    {self.output}",
            f"report    {report_path(self.output)}",
            f"results   {self.database} (similarity_scores, run_id={self.run_id})",
        ])

    def repairs_line(self) -> list[str]:
        if not self.repaired:
            return []
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.repaired.items()))
        return [f"repaired  {sum(self.repaired.values())} damaged or missing objects "
                f"recomputed ({kinds})"]

    def images_line(self) -> str:
        fetch = self.fetch
        latency = ""
        if fetch.attempted:
            p50, p95 = fetch.latency_seconds(0.5), fetch.latency_seconds(0.95)
            latency = f", latency p50 {p50:.3f} s p95 {p95:.3f} s"
        return (f"images    {fetch.attempted} downloaded ({fetch.ok} ok, {fetch.retries} retries, "
                f"{fetch.bytes / 1e6:.1f} MB{latency}), {fetch.cached} from cache")

    def render_fetch(self) -> str:
        """The summary of a fetch-only run (``sim-pipeline fetch``)."""
        errors = ", ".join(f"{code} {n}" for code, n in sorted(self.fetch.errors.items()))
        rate = self.fetch.attempted / self.seconds if self.seconds else 0.0
        return "\n".join([
            f"run       {self.run_id} (plan and fetch only)",
            f"rows      {self.rows}",
            self.images_line(),
            f"errors    {errors or 'none'}",
            f"time      {self.seconds:.1f} s ({rate:.1f} images/s)",
        ])


def over_chunks(run: Run, stage: str, plan: RunPlan, progress: bool) -> Iterator[Any]:
    """Run one stage over every chunk in order, with a progress bar in rows."""
    with tqdm(total=plan.rows, unit="row", desc=f"{stage:>12}", disable=not progress) as bar:
        for chunk in plan.chunks:
            yield run.run_stage(stage, chunk)
            bar.update(chunk.rows)


def score_csv(source: str | Path, settings: Settings, output: str | Path | None = None,
              progress: bool = True, run_id: str | None = None) -> RunSummary:
    """Score a CSV end to end: scored CSV next to it, rows in the results table.

    Stage by stage over all chunks (in the registry's order), so only one model tower is in
    memory at a time.
    """
    started = time.monotonic()
    source = Path(source)
    check_input_file(source)
    run = Run.open(settings)
    plan = run.plan(source, run_id=run_id)
    summary = RunSummary(plan.run_id, Path(output or default_output_path(source)),
                         run.results.shown_url)  # type: ignore[union-attr]
    try:
        for stage in CHUNK_STAGES:
            for result in over_chunks(run, stage, plan, progress):
                if stage == FETCH_IMAGES:
                    summary.fetch.add(result)
                elif stage == JOIN_SCORE:
                    summary.add(result)
            release_encoders()
        run.finalize(plan, summary.output)
    except BaseException:
        run.fail(plan.run_id)
        raise
    summary.repaired = run.repaired
    summary.seconds = time.monotonic() - started
    return summary


def fetch_csv(source: str | Path, settings: Settings, progress: bool = True,
              run_id: str | None = None) -> RunSummary:
    """Plan and fetch only: warms the image cache ahead of a GPU window; writes no results."""
    started = time.monotonic()
    run = Run.open(settings, record=False)
    plan = run.plan(source, run_id=run_id)
    summary = RunSummary(plan.run_id, default_output_path(source), "none", rows=plan.rows)
    for fetched in over_chunks(run, FETCH_IMAGES, plan, progress):
        summary.fetch.add(fetched)
    summary.seconds = time.monotonic() - started
    return summary
