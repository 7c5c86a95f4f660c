"""``score_frame``: score a Spark DataFrame of (image URL, caption) rows, as the CLI would.

The driver checks the columns (a missing or non-text column is refused in one sentence before
any work), numbers the rows by their position in the frame, spreads them over the cluster when
the frame has fewer than a few partitions per core, and hands each partition to
``executor.score_batches`` through ``mapInPandas``. The settings travel with the tasks as data.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from sim_pipeline.core.config import Settings, load_settings
from sim_pipeline.core.errors import UserError
from sim_pipeline.results.db import ResultsDB
from sim_pipeline.runners.lifecycle import check_model_folder
from sim_pipeline.spark import rows as row_numbers
from sim_pipeline.spark.executor import (
    CORRUPT_COLUMN,
    ROW_COLUMN,
    ScoringJob,
    check_batches,
    score_batches,
    warm_batches,
)
from sim_pipeline.stages.plan import find_column

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

# A few tasks per core, not one: rows differ in cost (a cached image costs nothing), and with one
# long task per core the cores that finish first wait for the last (bench.spark: the scoring
# job 20-23 s with one task per core, 18-22 s with four).
TASKS_PER_CORE = 4
# (application, settings): the warm-up job, run once per application
_WARM_UPS: dict[tuple[str, Settings], Future[None]] = {}


@dataclass(frozen=True)
class FrameSource:
    """How ``read_input`` read the frame, when it did: the CLI's rules apply to its rows."""

    location: str
    delimiter: str = ","
    from_csv: bool = False


def score_frame(df: DataFrame, url_col: str = "url", caption_col: str = "caption",
                settings: Settings | None = None, record: bool = False,
                run_id: str | None = None, source: FrameSource | None = None) -> DataFrame:
    """Every input column in order, plus ``similarity`` (double, null on error) and ``error``
    (string, null when scored): the values ``sim-pipeline score`` gives the same rows.

    ``record=True`` upserts each row into the results table under ``run_id`` (opened here, with
    the frame's row count; close it with ``finish_run`` once the result is written).
    """
    settings = settings or load_settings()
    columns = [c for c in df.columns if c != CORRUPT_COLUMN]
    url_col = _column(columns, url_col, "url")
    caption_col = _column(columns, caption_col, "caption")
    _check_text(df, url_col)
    _check_text(df, caption_col)
    _check_free(columns)
    if record and not run_id:
        raise UserError("Recording results needs a run id: pass run_id (--run-id).")
    if not settings.inference_url:  # a local folder that is not there: refused at once
        check_model_folder(settings.model)
    warm_executors(df.sparkSession, settings)  # the workers check the model while rows count
    numbered, rows = _numbered(df)
    _check_model(df.sparkSession, settings)
    source = source or FrameSource("a Spark DataFrame")
    job = ScoringJob(settings, tuple(columns), url_col, caption_col,
                     chunk_run_id=run_id or "spark", record_run_id=run_id if record else None,
                     from_csv=source.from_csv, delimiter=source.delimiter)
    if record:
        ResultsDB(settings.database_url, settings.db_retry_seconds).start_run(
            run_id, source.location, settings.model, rows, columns, source.delimiter)
    schema = df.select(*columns).schema.add("similarity", "double").add("error", "string")
    return numbered.mapInPandas(partial(score_batches, job), schema)


def warm_executors(spark: SparkSession, settings: Settings) -> Future[None]:
    """A job of one tiny task per core, in the background: each executor starts its Python
    worker, which checks the model as the CLI does (config and processor, no weights) and then
    loads it, in a thread of its own, while the driver reads and numbers the input; the
    scoring job reuses that worker. Done once the workers are started; it fails when the job
    could not run."""
    context = spark.sparkContext
    key = (context.applicationId, settings)
    if key in _WARM_UPS:
        return _WARM_UPS[key]
    done: Future[None] = Future()
    _WARM_UPS[key] = done
    warm = _one_task_per_core(spark).mapInPandas(partial(warm_batches, settings),
                                                 "problem string")

    def run() -> None:
        try:
            warm.collect()
        except Exception as error:  # noqa: BLE001 - handed to the caller of result()
            done.set_exception(error)
        else:
            done.set_result(None)

    threading.Thread(target=run, name="sim-pipeline-warm-up", daemon=True).start()
    return done


def executors_model_problem(spark: SparkSession, settings: Settings) -> str | None:
    """The executors' answer to the model check, from a job of one task per core that waits
    for each Python worker's check: the first sentence, None when the model can be scored."""
    warm_executors(spark, settings).result()
    rows = _one_task_per_core(spark).mapInPandas(partial(check_batches, settings),
                                                 "problem string").collect()
    problems = [row.problem for row in rows if row.problem]
    return problems[0] if problems else None


def _one_task_per_core(spark: SparkSession) -> DataFrame:
    slots = spark.sparkContext.defaultParallelism
    return spark.range(0, slots, 1, slots)


def finish_run(settings: Settings, run_id: str, succeeded: bool) -> None:
    """Close a recorded run; its counts come from the table, as for every run."""
    ResultsDB(settings.database_url, settings.db_retry_seconds).finish_run(
        run_id, "succeeded" if succeeded else "failed")


def _check_model(spark: SparkSession, settings: Settings) -> None:
    """A model that cannot be scored stops here in one sentence, before the scoring job. The
    executors answer: they are where the model loads, and the driver then imports neither
    torch nor transformers. Should their job fail, the driver checks."""
    if settings.inference_url:
        return
    try:
        problem = executors_model_problem(spark, settings)
    except Exception:  # noqa: BLE001 - the cluster could not run it: check here instead
        from sim_pipeline.stages.embed.families import check_backend

        check_backend(settings.model, settings.backend)
        return
    if problem:
        raise UserError(problem)


def _column(columns: list[str], wanted: str, what: str) -> str:
    return columns[find_column(columns, (), wanted, what)]


def _check_text(df: DataFrame, column: str) -> None:
    kind = df.schema[column].dataType.simpleString()
    if kind != "string":
        raise UserError(f"Column {column!r} holds {kind} values, not text; cast it to string "
                        "(F.col(name).cast('string')) before scoring.")


def _check_free(columns: list[str]) -> None:
    taken = [c for c in columns if c in ("similarity", "error", ROW_COLUMN)]
    if taken:
        raise UserError(f"The frame already has column {taken[0]!r}, which scoring adds; "
                        "rename or drop it first.")


def _numbered(df: DataFrame) -> tuple[DataFrame, int]:
    """The frame with each row's position (0, 1, ...) as ``ROW_COLUMN``, and the row count; a
    frame with fewer partitions than ``TASKS_PER_CORE`` per core is split by row ranges, in
    order."""
    numbered, total = row_numbers.numbered(df, ROW_COLUMN)
    parts = df.sparkSession.sparkContext.defaultParallelism * TASKS_PER_CORE
    if df.rdd.getNumPartitions() < parts and total > 1:
        numbered = row_numbers.spread(numbered, ROW_COLUMN, total, min(parts, total))
    return numbered, total
