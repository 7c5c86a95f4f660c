"""``sim-pipeline spark INPUT OUTPUT``: read a CSV or parquet input, score it on Spark, write
parquet (or, for an OUTPUT ending in ``.csv``, the CLI's scored CSV).

The same command runs under spark-submit (``python -m sim_pipeline.spark``), where the session
is the one spark-submit configured.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sim_pipeline.core.config import Settings
from sim_pipeline.core.errors import UserError
from sim_pipeline.core.layout import sha256_hex
from sim_pipeline.results.scored_csv import scored_csv_writer, scored_fields, scored_header
from sim_pipeline.spark.executor import CORRUPT_COLUMN
from sim_pipeline.spark.frame import FrameSource, finish_run, score_frame, warm_executors
from sim_pipeline.spark.s3_paths import spark_paths
from sim_pipeline.stages.plan import CAPTION_COLUMNS, URL_COLUMNS, find_column

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

CSV_SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t"}


@dataclass(frozen=True)
class SparkJobSummary:
    run_id: str
    rows: int
    scored: int
    output: str

    def render(self) -> str:
        return (f"run       {self.run_id}\nrows      {self.rows}: {self.scored} scored, "
                f"{self.rows - self.scored} errors\noutput    {self.output}")


def check_local_input(location: str) -> None:
    """A local input that is not there is refused at once, before Spark starts."""
    if "://" not in location and not Path(location).exists():
        raise UserError(f"Input {location} does not exist.")


def read_input(spark: SparkSession, location: str,
               path: str | None = None) -> tuple[DataFrame, FrameSource]:
    """The input as a frame of text columns, read with the CLI's CSV rules: a header row,
    quoted fields with line breaks and doubled quotes, a row with more fields than the header
    kept whole beside the row (it becomes ``malformed_row``). ``path`` is where Spark reads
    ``location`` from (a local copy, an ``s3a://`` path), when not there."""
    check_local_input(location)
    suffix = Path(location.rstrip("/")).suffix.lower()
    path = path or location
    if suffix not in CSV_SUFFIXES:
        return _spark_read(lambda: spark.read.parquet(path), location), FrameSource(location)
    delimiter = CSV_SUFFIXES[suffix]
    options = {"header": "true", "multiLine": "true", "escape": '"', "sep": delimiter,
               "encoding": "UTF-8", "mode": "PERMISSIVE",
               "columnNameOfCorruptRecord": CORRUPT_COLUMN}
    header = _spark_read(lambda: spark.read.options(**options).csv(path), location).schema
    if not header.fields:
        raise UserError(f"Input file {location} is empty: it needs a header row.")
    df = _spark_read(lambda: spark.read.options(**options)
                     .schema(header.add(CORRUPT_COLUMN, "string")).csv(path), location)
    return df, FrameSource(location, delimiter, from_csv=True)


def _spark_read(read, location: str) -> DataFrame:  # noqa: ANN001 - a thunk
    from pyspark.errors import AnalysisException

    try:
        return read()
    except AnalysisException as error:
        first = str(error).strip().splitlines()[0]
        raise UserError(f"Cannot read {location} with Spark: {first}") from None


def default_run_id(location: str, settings: Settings) -> str:
    """Named after the input and the settings that change results, like the CLI's run ids."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(location.rstrip("/")).stem).strip("-")[:40]
    digest = sha256_hex("|".join([location, settings.model, settings.variant]))[:12]
    return f"{stem or 'input'}-{digest}"


def run_spark_job(spark: SparkSession, location: str, output: str, settings: Settings,
                  record: bool = False, run_id: str | None = None) -> SparkJobSummary:
    if output.lower().endswith(".csv") and "://" in output:
        raise UserError(f"{output}: a scored CSV is written on this machine; give a local path, "
                        "or write parquet (an OUTPUT not ending in .csv) to S3.")
    warm_executors(spark, settings)  # the model loads while the driver reads the input
    with spark_paths(spark, settings, location, output) as (source_path, output_path):
        df, source = read_input(spark, location, source_path)
        columns = [c for c in df.columns if c != CORRUPT_COLUMN]
        url_col = columns[find_column(columns, URL_COLUMNS, settings.url_column, "url")]
        caption_col = columns[find_column(columns, CAPTION_COLUMNS, settings.caption_column,
                                          "caption")]
        run_id = run_id or default_run_id(location, settings)
        scored = score_frame(df, url_col, caption_col, settings, record=record, run_id=run_id,
                             source=source)
        try:
            counts = _write(spark, scored, columns, output_path, source.delimiter)
        except BaseException:
            if record:
                finish_run(settings, run_id, succeeded=False)
            raise
    if record:
        finish_run(settings, run_id, succeeded=True)
    return SparkJobSummary(run_id, *counts, output)


def _write(spark: SparkSession, scored: DataFrame, columns: list[str], output: str,
           delimiter: str) -> tuple[int, int]:
    """Parquet, or the CLI's scored CSV for a path ending in .csv: (rows, rows scored)."""
    if output.lower().endswith(".csv"):
        return _write_csv(scored, columns, output, delimiter)
    scored.write.mode("overwrite").parquet(output)
    return _counts(spark.read.parquet(output))


def _counts(scored: DataFrame) -> tuple[int, int]:
    from pyspark.sql import functions as F

    row = scored.agg(F.count(F.lit(1)), F.count("similarity")).first()
    return int(row[0]), int(row[1])


def _write_csv(scored: DataFrame, columns: list[str], output: str,
               delimiter: str) -> tuple[int, int]:
    """The CLI's scored CSV, one file: scored on the cluster in parallel (and kept), then
    streamed to the driver a partition at a time in row order (the next one's job running
    while this one is written)."""
    from pyspark import StorageLevel

    kept = scored.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        counts = _counts(kept)
        with scored_csv_writer(output, delimiter) as writer:
            writer.writerow(scored_header(columns))
            for row in kept.toLocalIterator(prefetchPartitions=True):
                values = ["" if v is None else v if isinstance(v, str) else str(v)
                          for v in row[:len(columns)]]
                writer.writerow(scored_fields(values, row["similarity"], row["error"]))
    finally:
        kept.unpersist()
    return counts
