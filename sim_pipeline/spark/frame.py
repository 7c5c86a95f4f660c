"""``score_frame``: score a Spark DataFrame of (image URL, caption) rows, as the CLI would.

The driver checks the columns (a missing or non-text column is refused in one sentence before
any work), numbers the rows by their position in the frame, spreads them over the cluster when
the frame has fewer partitions than cores, and hands each partition to ``executor.score_batches``
through ``mapInPandas``. The settings travel with the tasks as data.
"""

from __future__ import annotations

import contextlib
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
    score_batches,
    warm_batches,
)
from sim_pipeline.stages.plan import find_column

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

_WARMED: set[tuple[str, Settings]] = set()  # (application, settings) warmed up already
_MODEL_CHECKS: dict[tuple[str, str], Future[None]] = {}  # (model, backend): checked or checking


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
    _check_model(settings)
    warm_executors(df.sparkSession, settings)
    numbered, rows = _numbered(df)
    source = source or FrameSource("a Spark DataFrame")
    job = ScoringJob(settings, tuple(columns), url_col, caption_col,
                     chunk_run_id=run_id or "spark", record_run_id=run_id if record else None,
                     from_csv=source.from_csv, delimiter=source.delimiter)
    if record:
        ResultsDB(settings.database_url, settings.db_retry_seconds).start_run(
            run_id, source.location, settings.model, rows, columns, source.delimiter)
    schema = df.select(*columns).schema.add("similarity", "double").add("error", "string")
    return numbered.mapInPandas(partial(score_batches, job), schema)


def warm_executors(spark: SparkSession, settings: Settings) -> None:
    """A job of one tiny task per core, in the background: each executor's Python worker starts
    loading the model now, while the driver numbers and spreads the rows, and the scoring job
    reuses that worker. A warm-up that fails costs nothing: the scoring job loads the model."""
    context = spark.sparkContext
    if (context.applicationId, settings) in _WARMED:
        return
    _WARMED.add((context.applicationId, settings))
    slots = context.defaultParallelism
    warm = spark.range(0, slots, 1, slots).mapInPandas(partial(warm_batches, settings), "id long")

    def run() -> None:
        with contextlib.suppress(Exception):
            warm.collect()

    threading.Thread(target=run, name="sim-pipeline-warm-up", daemon=True).start()


def finish_run(settings: Settings, run_id: str, succeeded: bool) -> None:
    """Close a recorded run; its counts come from the table, as for every run."""
    ResultsDB(settings.database_url, settings.db_retry_seconds).finish_run(
        run_id, "succeeded" if succeeded else "failed")


def check_model_soon(settings: Settings) -> None:
    """Start checking the model in a thread (importing torch and transformers takes seconds),
    so the check overlaps the cluster's start; ``score_frame`` waits for its answer."""
    key = (settings.model, settings.backend)
    if settings.inference_url or key in _MODEL_CHECKS:
        return
    check_model_folder(settings.model)  # a local folder that is not there: refused at once
    answer: Future[None] = Future()
    _MODEL_CHECKS[key] = answer

    def check() -> None:
        from sim_pipeline.stages.embed.families import check_backend

        try:
            check_backend(settings.model, settings.backend)
        except BaseException as error:  # noqa: BLE001 - handed to the caller of result()
            answer.set_exception(error)
        else:
            answer.set_result(None)

    threading.Thread(target=check, name="sim-pipeline-model-check", daemon=True).start()


def _check_model(settings: Settings) -> None:
    """A model that cannot be scored stops here in one sentence, before the scoring job (its
    config and processor are resolved, no weights loaded)."""
    if settings.inference_url:
        return
    check_model_soon(settings)
    _MODEL_CHECKS[(settings.model, settings.backend)].result()


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
    frame with fewer partitions than the cluster has cores is split by row ranges, in order."""
    numbered, total = row_numbers.numbered(df, ROW_COLUMN)
    cores = df.sparkSession.sparkContext.defaultParallelism
    if df.rdd.getNumPartitions() < cores and total > 1:
        numbered = row_numbers.spread(numbered, ROW_COLUMN, total, min(cores, total))
    return numbered, total
