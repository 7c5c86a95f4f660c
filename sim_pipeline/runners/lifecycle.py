"""One run's lifecycle, whoever drives it: the CLI's loop, ``stage`` commands, Kubernetes pods,
Airflow tasks and ``score_pairs`` all go through ``Run``.

    plan (open the run) -> per-chunk stages, each timed -> finalize (scored CSV, run succeeded,
    report) | fail (run failed)

Every step is idempotent: a stage whose output exists in the store returns at once, and the
results table is keyed by (run, row), so any step can be repeated after a crash.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from sim_pipeline.core.config import Settings
from sim_pipeline.core.errors import UserError
from sim_pipeline.core.layout import (
    EMBED_IMAGES,
    EMBED_TEXTS,
    FETCH_IMAGES,
    FINALIZE,
    JOIN_SCORE,
    PLAN,
    ChunkRef,
    model_check_key,
)
from sim_pipeline.core.store import ObjectStore, open_store, write_json
from sim_pipeline.results.db import RUN_LEVEL, ResultsDB
from sim_pipeline.results.report import report_path, write_report
from sim_pipeline.stages.embed.images import embed_images_chunk
from sim_pipeline.stages.embed.texts import embed_texts_chunk
from sim_pipeline.stages.fetch.chunk import fetch_chunk
from sim_pipeline.stages.finalize import default_output_path, write_scored_csv
from sim_pipeline.stages.plan import (
    RunPlan,
    check_input_file,
    default_run_id,
    load_plan,
    plan_csv,
)
from sim_pipeline.stages.score import join_score_chunk

log = logging.getLogger(__name__)
ChunkStage = Callable[[ChunkRef, ObjectStore, Settings, "ResultsDB | None"], Any]

# The per-chunk stages, by name: each reads its inputs from the store and writes its output there.
CHUNK_STAGES: dict[str, ChunkStage] = {
    FETCH_IMAGES: lambda chunk, store, settings, _: fetch_chunk(chunk, store, settings),
    EMBED_IMAGES: lambda chunk, store, settings, _: embed_images_chunk(chunk, store, settings),
    EMBED_TEXTS: lambda chunk, store, settings, _: embed_texts_chunk(chunk, store, settings),
    JOIN_SCORE: join_score_chunk,
}


@dataclass(frozen=True)
class Finished:
    """What finalize left behind."""

    run_id: str
    output: Path
    report: Path
    rows: int


@dataclass
class Run:
    """A run's settings, object store and results database (None: results are not recorded)."""

    settings: Settings
    store: ObjectStore
    results: ResultsDB | None

    @classmethod
    def open(cls, settings: Settings, record: bool = True) -> Run:
        results = ResultsDB(settings.database_url) if record else None
        return cls(settings, open_store(settings.store, settings.s3), results)

    def plan(self, input_path: str | Path, source: str | None = None) -> RunPlan:
        """Split the input into chunks and open the run in the results table.

        ``source`` is what the run records as its input when ``input_path`` is a local copy of
        it (an s3:// object downloaded for planning, say).
        """
        started = time.monotonic()
        path = Path(input_path)
        check_input_file(path)
        run_id = self.settings.run_id or default_run_id(path, self.settings)
        if self.results is not None:
            self.check_model(run_id)
        plan = plan_csv(path, self.store, self.settings, run_id)
        if self.results is not None:
            self.results.start_run(plan.run_id, source or str(input_path), self.settings.model,
                                   plan.rows, plan.columns, plan.delimiter)
        self.record(plan.run_id, PLAN, RUN_LEVEL, time.monotonic() - started)
        return plan

    def check_model(self, run_id: str) -> None:
        """Resolve the model's config and processor (no weights) before any work, once per run:
        a wrong model or backend stops the run in seconds instead of after the fetch stage."""
        key = model_check_key(run_id, self.settings.model, self.settings.backend)
        if self.store.exists(key):
            return
        from sim_pipeline.stages.embed.families import check_backend

        family = check_backend(self.settings.model, self.settings.backend).family
        write_json(self.store, key, {"model": self.settings.model, "family": family.name,
                                     "backend": self.settings.backend})

    def load_plan(self, run_id: str | None = None) -> RunPlan:
        run_id = run_id or self.settings.run_id
        if run_id is None:
            raise UserError("This stage needs the run id: pass --run-id or SIM_PIPELINE_RUN_ID.")
        return load_plan(self.store, run_id)

    def chunk(self, index: int) -> ChunkRef:
        chunks = self.load_plan().chunks
        if not 0 <= index < len(chunks):
            raise UserError(f"Run {self.settings.run_id} has {len(chunks)} chunks, none "
                            f"numbered {index}.")
        return chunks[index]

    def run_stage(self, stage: str, chunk: ChunkRef) -> Any:
        """One per-chunk stage on one chunk, timed."""
        with self.timed(chunk.run_id, stage, chunk.index):
            return CHUNK_STAGES[stage](chunk, self.store, self.settings, self.results)

    def finalize(self, plan: RunPlan, output: str | Path | None = None) -> Finished:
        """Write the scored CSV, close the run as succeeded, and write its report beside the CSV."""
        with self.timed(plan.run_id, FINALIZE):
            path = write_scored_csv(plan, self.store, self.settings,
                                    output or default_output_path(plan.source))
        report = report_path(path)
        if self.results is not None:
            self.results.finish_run(plan.run_id, "succeeded")
            write_report(plan.run_id, self.settings, report)
        return Finished(plan.run_id, path, report, plan.rows)

    def fail(self, run_id: str) -> None:
        """Mark the run failed; best effort, since the failure may be the database's own."""
        if self.results is None:
            return
        try:
            self.results.finish_run(run_id, "failed")
        except (UserError, sa.exc.SQLAlchemyError) as error:
            log.warning("Could not mark run %s as failed: %s", run_id,
                        str(error).splitlines()[0])

    @contextmanager
    def timed(self, run_id: str, stage: str, chunk: int = RUN_LEVEL) -> Iterator[None]:
        """Record how long the block took as ``stage`` of ``chunk``, if it succeeds."""
        started = time.monotonic()
        yield
        self.record(run_id, stage, chunk, time.monotonic() - started)

    def record(self, run_id: str, stage: str, chunk: int, seconds: float) -> None:
        """Keep a stage's time; best effort: timings must never fail the work they measure."""
        if self.results is None:
            return
        try:
            self.results.record_stage(run_id, stage, chunk, seconds)
        except (UserError, sa.exc.SQLAlchemyError) as error:
            log.warning("Could not record how long %s took: %s", stage,
                        str(error).splitlines()[0])
