"""The in-process runner: every stage over every chunk, for the CLI and one-off files.

Airflow runs the same stage functions as mapped tasks instead; this module is only the loop.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from sim_pipeline.config import Settings
from sim_pipeline.embed import embed_images_chunk, embed_texts_chunk
from sim_pipeline.fetch import FetchStats, fetch_chunk
from sim_pipeline.finalize import default_output_path, write_scored_csv
from sim_pipeline.layout import ChunkRef
from sim_pipeline.model import release_encoders
from sim_pipeline.plan import RunPlan, check_input_file, plan_input
from sim_pipeline.report import write_report
from sim_pipeline.results_db import RUN_LEVEL, ResultsDB, masked, timed
from sim_pipeline.score import ScoredRow, join_score_chunk
from sim_pipeline.stages import report_path
from sim_pipeline.store import ObjectStore, open_store

T = TypeVar("T")


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
            f"time      {self.seconds:.1f} s ({rate:.1f} rows/s)",
            f"output    {self.output}",
            f"report    {report_path(self.output)}",
            f"results   {self.database} (similarity_scores, run_id={self.run_id})",
        ])

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


def run_chunk(chunk: ChunkRef, store: ObjectStore, settings: Settings,
              results: ResultsDB | None) -> tuple[list[ScoredRow], FetchStats]:
    """All per-chunk stages in order; each one skips the work it finds already done."""
    with timed(results, chunk.run_id, "fetch-images", chunk.index):
        fetched = fetch_chunk(chunk, store, settings)
    with timed(results, chunk.run_id, "embed-images", chunk.index):
        embed_images_chunk(chunk, store, settings)
    with timed(results, chunk.run_id, "embed-texts", chunk.index):
        embed_texts_chunk(chunk, store, settings)
    with timed(results, chunk.run_id, "join-score", chunk.index):
        scored = join_score_chunk(chunk, store, settings, results)
    return scored, fetched


def over_chunks(stage: str, work: Callable[[ChunkRef, ObjectStore, Settings], T], plan: RunPlan,
                store: ObjectStore, settings: Settings, results: ResultsDB | None,
                progress: bool) -> Iterator[T]:
    """Run one stage over every chunk in order, timed, with a progress bar in rows."""
    with tqdm(total=plan.rows, unit="row", desc=f"{stage:>12}", disable=not progress) as bar:
        for chunk in plan.chunks:
            with timed(results, chunk.run_id, stage, chunk.index):
                yield work(chunk, store, settings)
            bar.update(chunk.rows)


def score_csv(source: str | Path, settings: Settings, output: str | Path | None = None,
              progress: bool = True) -> RunSummary:
    """Score a CSV end to end: scored CSV next to it, rows in the results table."""
    started = time.monotonic()
    source = Path(source)
    check_input_file(source)
    store = open_store(settings.store)
    results = ResultsDB(settings.database_url)
    planning = time.monotonic()
    plan: RunPlan = plan_input(source, store, settings)
    run_id = plan.run_id
    summary = RunSummary(run_id, Path(output or default_output_path(source)),
                         masked(results.url))
    results.start_run(run_id, str(source), settings.model, plan.rows, plan.columns,
                      plan.delimiter)
    results.record_stage(run_id, "plan", RUN_LEVEL, time.monotonic() - planning)
    try:
        for fetched in over_chunks("fetch-images", fetch_chunk, plan, store, settings, results,
                                   progress):
            summary.fetch.add(fetched)
        # Stage by stage over all chunks: one model tower in memory at a time.
        for stage, work in (("embed-images", embed_images_chunk),
                            ("embed-texts", embed_texts_chunk)):
            for _ in over_chunks(stage, work, plan, store, settings, results, progress):
                pass
            release_encoders()
        join = functools.partial(join_score_chunk, results=results)
        for scored in over_chunks("join-score", join, plan, store, settings, results, progress):
            summary.add(scored)
        with timed(results, run_id, "finalize"):
            write_scored_csv(plan, store, settings, summary.output)
    except BaseException:
        results.finish_run(run_id, "failed")
        raise
    results.finish_run(run_id, "succeeded")
    write_report(run_id, settings, report_path(summary.output))
    summary.seconds = time.monotonic() - started
    return summary


def fetch_csv(source: str | Path, settings: Settings, progress: bool = True) -> RunSummary:
    """Plan and fetch only: warms the image cache ahead of a GPU window; writes no results."""
    started = time.monotonic()
    source = Path(source)
    store = open_store(settings.store)
    plan = plan_input(source, store, settings)
    summary = RunSummary(plan.run_id, default_output_path(source), "none", rows=plan.rows)
    for fetched in over_chunks("fetch-images", fetch_chunk, plan, store, settings, None,
                               progress):
        summary.fetch.add(fetched)
    summary.seconds = time.monotonic() - started
    return summary
