"""One run's lifecycle, whoever drives it: the CLI's loop, ``stage`` commands, Kubernetes pods,
Airflow tasks and ``score_pairs`` all go through ``Run``.

    plan (open the run) -> per-chunk stages, each timed -> finalize (scored CSV, run succeeded,
    report) | fail (run failed)

Every step is idempotent: a stage whose output exists in the store returns at once, and the
results table is keyed by (run, row), so any step can be repeated after a crash.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from sim_pipeline.core import repairs
from sim_pipeline.core.config import Settings
from sim_pipeline.core.errors import UserError
from sim_pipeline.core.faults import fault_sentence
from sim_pipeline.core.layout import (
    FINALIZE,
    JOIN_SCORE,
    PENDING_FAILURES_KEY,
    PLAN,
    ChunkRef,
    model_check_key,
)
from sim_pipeline.core.store import (
    IntegrityError,
    MissingObject,
    ObjectStore,
    open_store,
    read_json,
    write_json,
)
from sim_pipeline.results.db import RUN_LEVEL, ResultsDB
from sim_pipeline.results.report import report_path, write_report
from sim_pipeline.runners.store_verify import remove_debris
from sim_pipeline.stages.embed.error_bound import ErrorBound, measure_error_bound
from sim_pipeline.stages.finalize import default_output_path, write_scored_csv
from sim_pipeline.stages.plan import (
    RunPlan,
    check_input,
    default_run_id,
    load_plan,
    plan_csv,
)
from sim_pipeline.stages.registry import CHUNK_STAGES

log = logging.getLogger(__name__)
# How a model given as a local folder is written; anything else is a model hub id.
LOCAL_PATH_PREFIXES = ("/", "./", "../", "~")


def check_model_folder(model: str) -> None:
    """Refuse at once a model given as a local path (absolute, ``./``, ``../``, ``~``) that is
    not a folder: the model hub, asked for it instead, takes seconds and answers about repo ids."""
    if model.startswith(LOCAL_PATH_PREFIXES) and not Path(model).expanduser().is_dir():
        raise UserError(f"Model {model}: no such folder; set SIM_PIPELINE_MODEL (or --model) to "
                        "a Hugging Face hub id or a folder saved with save_pretrained.")


@dataclass(frozen=True)
class Finished:
    """What finalize left behind."""

    run_id: str
    output: Path
    report: Path
    rows: int
    error_bound: ErrorBound | None = None  # quantised backends: measured against fp32


@dataclass
class Run:
    """A run's settings, object store and results database (None: results are not recorded),
    and the damaged or missing objects its steps found and recomputed, by kind."""

    settings: Settings
    store: ObjectStore
    results: ResultsDB | None
    repaired: Counter[str] = field(default_factory=Counter)
    # Stage timings the database did not take when they were measured (it was away): tried
    # again with the next timing and when the run finishes. (run_id, stage, chunk, seconds)
    unrecorded: list[tuple[str, str, int, float]] = field(default_factory=list)
    # embed-texts times its chunks from a thread beside fetch-images: one recorder at a time
    recording: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, settings: Settings, record: bool = True) -> Run:
        results = ResultsDB(settings.database_url, settings.db_retry_seconds) if record else None
        run = cls(settings, open_store(settings.store, settings.s3), results)
        run.mark_pending_failures()
        return run

    def plan(self, input_path: str | Path, source: str | None = None,
             run_id: str | None = None) -> RunPlan:
        """Split the input into chunks and open the run in the results table.

        ``source`` is what the run records as its input when ``input_path`` is a local copy of
        it (an s3:// object downloaded for planning, say); without ``run_id`` the run is named
        after the input's content. A run refused once it has an id (given, or read from the
        input) is recorded failed with its one sentence, so ``results runs`` shows why.
        """
        started, started_at = time.monotonic(), datetime.now(UTC)  # the run's wall time from here
        path, source = Path(input_path), source or str(input_path)
        try:
            check_input(path, self.settings)  # before the model check: a bad input fails fast
            run_id = run_id or default_run_id(path, self.settings)
            with self.model_checked_beside(run_id), self.counting_repairs():
                plan = plan_csv(path, self.store, self.settings, run_id)
        except BaseException as error:
            if run_id:
                self.fail(run_id, fault_sentence(error), source)
            raise
        if self.results is not None:
            self.results.start_run(plan.run_id, source, self.settings.model, plan.rows,
                                   plan.columns, plan.delimiter, started_at)
        self.record(plan.run_id, PLAN, RUN_LEVEL, time.monotonic() - started)
        return plan

    @contextmanager
    def model_checked_beside(self, run_id: str) -> Iterator[None]:
        """The model check (``check_model``) in a thread while the block plans the input: on a
        cold machine its first torch and transformers imports take seconds that planning need
        not wait for. Both are done when the block ends, before any fetch; a failing check's
        sentence wins over a failing block's (the check was the first step before)."""
        if self.results is None:  # nothing recorded, nothing scored (``fetch``): no check
            yield
            return
        with ThreadPoolExecutor(1, thread_name_prefix="model-check") as beside:
            checked = beside.submit(self.check_model, run_id)
            try:
                yield
            except BaseException:
                checked.result()  # the model's sentence, if it failed too
                raise
            checked.result()

    def check_model(self, run_id: str) -> None:
        """Resolve the model's config and processor (no weights) before any work, once per run:
        a wrong model or backend stops the run in seconds instead of after the fetch stage."""
        if not self.settings.inference_url:  # else the service holds the model: it is asked
            check_model_folder(self.settings.model)
        where = self.settings.inference_url or self.settings.backend
        key = model_check_key(run_id, self.settings.model, where)
        if self.store.exists(key):
            return
        if self.settings.inference_url:  # the service holds the model: ask it
            from sim_pipeline.stages.embed.encoders import remote_encoder

            with remote_encoder(self.settings) as client:
                client.text_vectors(["a model check"])
            family = "served"
        else:
            from sim_pipeline.stages.embed.families import checked_family

            family = checked_family(self.settings.model, self.settings.backend, self.store)
        write_json(self.store, key, {"model": self.settings.model, "family": family,
                                     "backend": where})

    def load_plan(self, run_id: str | None) -> RunPlan:
        if not run_id:
            raise UserError("This stage needs the run id: pass --run-id or SIM_PIPELINE_RUN_ID.")
        return load_plan(self.store, run_id)

    def chunk(self, run_id: str | None, index: int) -> ChunkRef:
        chunks = self.load_plan(run_id).chunks
        if not 0 <= index < len(chunks):
            raise UserError(f"Run {run_id} has {len(chunks)} chunks, none numbered {index}.")
        return chunks[index]

    def run_stage(self, name: str, chunk: ChunkRef) -> Any:
        """One per-chunk stage on one chunk, timed. When an input it reads from the store is
        missing or damaged, the stages it needs run again (each redoes only what it finds
        missing or damaged), then the stage once more."""
        stage = CHUNK_STAGES[name]
        with self.timed(chunk.run_id, name, chunk.index), self.counting_repairs():
            try:
                return stage.run(chunk, self.store, self.settings, self.results)
            except (IntegrityError, MissingObject) as damaged:
                if not stage.needs:
                    raise
                repairs.note(f"{name} input", f"chunk {chunk.index} of {chunk.run_id}", damaged)
            for needed in stage.needs:
                CHUNK_STAGES[needed].run(chunk, self.store, self.settings, self.results)
            return stage.run(chunk, self.store, self.settings, self.results)

    @contextmanager
    def counting_repairs(self) -> Iterator[None]:
        """Add the block's repairs to the run's, with one warning per kind of object."""
        with repairs.counted() as found:
            try:
                yield
            finally:
                self.repaired.update(found)
                repairs.warn(found)

    def finalize(self, plan: RunPlan, output: str | Path | None = None) -> Finished:
        """Write the scored CSV, close the run as succeeded, and write its report beside the CSV."""
        output = output or default_output_path(plan.source)
        with self.timed(plan.run_id, FINALIZE), self.counting_repairs():
            try:
                path = write_scored_csv(plan, self.store, self.settings, output)
            except (IntegrityError, MissingObject) as damaged:  # no partial file was left
                repairs.note("results", f"of run {plan.run_id}", damaged)
                for chunk in plan.chunks:  # join-score redoes only what is damaged or missing
                    self.run_stage(JOIN_SCORE, chunk)
                path = write_scored_csv(plan, self.store, self.settings, output)
            # in finalize's time: on an int8 run, its fp32 sample is a visible share of a run
            bound = measure_error_bound(plan.chunks, self.store, self.settings)
        report = report_path(path)
        if self.results is not None:
            if bound is not None:
                self.results.record_error_bound(plan.run_id, bound.pairs, bound.largest,
                                                bound.p99)
            self.record_unrecorded(final=True)
            from sim_pipeline.runners.canaries import score_canaries  # imports the API: late

            score_canaries(plan.run_id, self.settings, self.results)
            self.results.finish_run(plan.run_id, "succeeded")
            write_report(plan.run_id, self.settings, report)
        remove_debris(self.store)  # what earlier, killed attempts left: a clean exit leaves none
        return Finished(plan.run_id, path, report, plan.rows, bound)

    def fail(self, run_id: str, failure: str | None = None, source: str | None = None) -> None:
        """Mark the run failed, with its one sentence; with ``source``, a run refused before
        its plan opened it gets its row too. When the failure is the database's own, remember
        it in the store instead: the next run that reaches the database marks it
        (``mark_pending_failures``)."""
        if self.results is None:
            return
        try:
            if source is not None:
                self.results.open_run_if_absent(run_id, source, self.settings.model, 0)
            self.results.finish_run(run_id, "failed", failure=failure)
        except (UserError, sa.exc.SQLAlchemyError):
            with contextlib.suppress(UserError, OSError):
                pending = self._pending_failures()
                pending[run_id] = datetime.now(UTC).isoformat()
                write_json(self.store, PENDING_FAILURES_KEY, pending)

    def mark_pending_failures(self) -> None:
        """Mark failed the runs that failed while the database was away (unless rerun since)."""
        pending = self._pending_failures() if self.results is not None else {}
        if not pending:
            return
        for run_id, failed_at in pending.items():
            self.results.finish_run(run_id, "failed", datetime.fromisoformat(failed_at))
        write_json(self.store, PENDING_FAILURES_KEY, {})

    def _pending_failures(self) -> dict[str, str]:
        try:
            return dict(read_json(self.store, PENDING_FAILURES_KEY))
        except MissingObject:
            return {}

    @contextmanager
    def timed(self, run_id: str, stage: str, chunk: int = RUN_LEVEL) -> Iterator[None]:
        """Record how long the block took as ``stage`` of ``chunk``, if it succeeds."""
        started = time.monotonic()
        yield
        self.record(run_id, stage, chunk, time.monotonic() - started)

    def record(self, run_id: str, stage: str, chunk: int, seconds: float) -> None:
        """Keep a stage's time; best effort: timings must never fail the work they measure. One
        the database does not take now is kept and tried again later (``record_unrecorded``)."""
        if self.results is None:
            return
        self.unrecorded.append((run_id, stage, chunk, seconds))
        self.record_unrecorded()

    def record_unrecorded(self, final: bool = False) -> None:
        """Record the kept timings; when the run finishes (``final``) and the database still
        does not take them, say once that the report lacks them: the scores are whole."""
        try:
            with self.recording:
                while self.unrecorded:
                    self.results.record_stage(*self.unrecorded[0])  # type: ignore[union-attr]
                    self.unrecorded.pop(0)
        except (UserError, sa.exc.SQLAlchemyError) as error:
            log.debug("Stage timing not recorded yet: %s", str(error).splitlines()[0])
            if final:
                stages = sorted({stage for _, stage, _, _ in self.unrecorded})
                log.warning("The run's report lacks the time of %s: the results database did "
                            "not take it; the scores are complete.", ", ".join(stages))
