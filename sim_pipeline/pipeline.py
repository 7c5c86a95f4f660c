"""The in-process runner: every stage over every chunk, for the CLI and one-off files.

Airflow runs the same stage functions as mapped tasks instead; this module is only the loop.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from sim_pipeline.config import Settings
from sim_pipeline.embed import embed_images_chunk, embed_texts_chunk
from sim_pipeline.fetch import FetchStats, fetch_chunk
from sim_pipeline.finalize import default_output_path, write_scored_csv
from sim_pipeline.layout import ChunkRef
from sim_pipeline.plan import RunPlan, check_input_file, default_run_id, plan_csv
from sim_pipeline.results_db import ResultsDB, masked
from sim_pipeline.score import ScoredRow, join_score_chunk
from sim_pipeline.store import ObjectStore, open_store


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

    def add(self, scored: list[ScoredRow], fetched: FetchStats) -> None:
        self.rows += len(scored)
        self.ok += sum(1 for s in scored if s.error is None)
        self.errors.update(s.error for s in scored if s.error)
        self.fetch.attempted += fetched.attempted
        self.fetch.ok += fetched.ok
        self.fetch.cached += fetched.cached
        self.fetch.bytes += fetched.bytes
        self.fetch.errors.update(fetched.errors)

    def render(self) -> str:
        errors = ", ".join(f"{code} {n}" for code, n in sorted(self.errors.items())) or "none"
        rate = self.rows / self.seconds if self.seconds else 0.0
        return "\n".join([
            f"run       {self.run_id}",
            f"rows      {self.rows}: {self.ok} scored, {self.rows - self.ok} errors",
            f"errors    {errors}",
            f"images    {self.fetch.attempted} downloaded ({self.fetch.ok} ok, "
            f"{self.fetch.bytes / 1e6:.1f} MB), {self.fetch.cached} from cache",
            f"time      {self.seconds:.1f} s ({rate:.1f} rows/s)",
            f"output    {self.output}",
            f"results   {self.database} (similarity_scores, run_id={self.run_id})",
        ])


def run_chunk(chunk: ChunkRef, store: ObjectStore, settings: Settings,
              results: ResultsDB | None) -> tuple[list[ScoredRow], FetchStats]:
    """All per-chunk stages in order; each one skips the work it finds already done."""
    fetched = fetch_chunk(chunk, store, settings)
    embed_images_chunk(chunk, store, settings)
    embed_texts_chunk(chunk, store, settings)
    return join_score_chunk(chunk, store, settings, results), fetched


def score_csv(source: str | Path, settings: Settings, output: str | Path | None = None,
              progress: bool = True) -> RunSummary:
    """Score a CSV end to end: scored CSV next to it, rows in the results table."""
    started = time.monotonic()
    source = Path(source)
    check_input_file(source)
    store = open_store(settings.store)
    results = ResultsDB(settings.database_url)
    run_id = settings.run_id or default_run_id(source, settings)
    plan: RunPlan = plan_csv(source, store, settings, run_id)
    summary = RunSummary(run_id, Path(output or default_output_path(source)),
                         masked(results.url))
    results.start_run(run_id, str(source), settings.model, plan.rows)
    try:
        with tqdm(total=plan.rows, unit="row", desc="scoring", disable=not progress) as bar:
            for chunk in plan.chunks:
                scored, fetched = run_chunk(chunk, store, settings, results)
                summary.add(scored, fetched)
                bar.update(chunk.rows)
        write_scored_csv(plan, store, settings, summary.output)
    except BaseException:
        results.finish_run(run_id, "failed")
        raise
    results.finish_run(run_id, "succeeded")
    summary.seconds = time.monotonic() - started
    return summary
