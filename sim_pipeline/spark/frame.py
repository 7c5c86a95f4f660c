"""``score_frame``: score a Spark DataFrame of (image URL, caption) rows, as the CLI would.

The driver checks the columns (a missing or non-text column is refused in one sentence before
any work), numbers the rows by their position in the frame, spreads them over the cluster when
the frame has fewer partitions than cores, and hands each partition to ``executor.score_batches``
through ``mapInPandas``. The settings travel with the tasks as data.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from sim_pipeline.core.config import Settings, load_settings
from sim_pipeline.core.errors import UserError
from sim_pipeline.results.db import ResultsDB
from sim_pipeline.spark.executor import CORRUPT_COLUMN, ROW_COLUMN, ScoringJob, score_batches
from sim_pipeline.stages.plan import find_column

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

OFFSET_BITS = 33  # monotonically_increasing_id: partition index above, position below


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


def finish_run(settings: Settings, run_id: str, succeeded: bool) -> None:
    """Close a recorded run; its counts come from the table, as for every run."""
    ResultsDB(settings.database_url, settings.db_retry_seconds).finish_run(
        run_id, "succeeded" if succeeded else "failed")


def _check_model(settings: Settings) -> None:
    """A model that cannot be scored stops here in one sentence, before any Spark job (its
    config and processor are resolved, no weights loaded)."""
    if settings.inference_url:
        return
    from sim_pipeline.stages.embed.families import check_backend

    check_backend(settings.model, settings.backend)


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
    """The frame with each row's position (0, 1, ...) as ``ROW_COLUMN``, and the row count.

    Positions come from each partition's row count (one small job) and the row's place in its
    partition, so a retried task numbers its rows as the first attempt did. A frame with fewer
    partitions than the cluster has cores is then split by row ranges, kept in order.
    """
    from pyspark.sql import functions as F

    tagged = df.withColumn("_sim_part", F.spark_partition_id()).withColumn(
        "_sim_id", F.monotonically_increasing_id())
    counts = dict(tagged.groupBy("_sim_part").count().collect())
    offsets, total = [], 0
    for part in sorted(counts):
        offsets.append((part, total))
        total += counts[part]
    starts = df.sparkSession.createDataFrame(offsets or [(0, 0)], "_sim_part int, _sim_start long")
    local = F.col("_sim_id").bitwiseAND(F.lit((1 << OFFSET_BITS) - 1))
    numbered = tagged.join(F.broadcast(starts), "_sim_part").withColumn(
        ROW_COLUMN, F.col("_sim_start") + local).drop("_sim_part", "_sim_id", "_sim_start")
    cores = df.sparkSession.sparkContext.defaultParallelism
    if df.rdd.getNumPartitions() < cores and total > 1:
        numbered = numbered.repartitionByRange(min(cores, total), ROW_COLUMN) \
            .sortWithinPartitions(ROW_COLUMN)
    return numbered, total
