"""``sim-pipeline results export``: a run's scored CSV (or Parquet) rebuilt from the database alone.

The CSV is the one ``score`` and ``finalize`` write, byte for byte: the input's columns and
delimiter (kept in ``scoring_runs``), each row's input values (kept in ``similarity_scores``), and
the same row formatting (``scored_csv.scored_fields``). Rows written before the database kept input
values (schema 001) come out in a reduced layout: ``image_url, caption, similarity, error``.
Parquet has the same columns in the same order, with ``similarity`` a double and nulls for empty.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sim_pipeline.core.errors import UserError
from sim_pipeline.core.files import atomic_path
from sim_pipeline.core.streams import batched
from sim_pipeline.results.db import ResultsDB
from sim_pipeline.results.query import ExportRow, RunInfo, export_rows, get_run, rows_without_fields
from sim_pipeline.results.scored_csv import scored_csv_writer, scored_fields, scored_header

REDUCED_COLUMNS = ["image_url", "caption"]
PARQUET_BATCH = 50_000


@dataclass(frozen=True)
class Export:
    run: RunInfo
    path: Path
    rows: int
    reduced: bool  # True: the input's columns were not kept, only image_url and caption


def _layout(db: ResultsDB, run: RunInfo) -> tuple[list[str], str, bool]:
    """The columns and delimiter to write, and whether that is the reduced layout."""
    if run.input_columns is None or rows_without_fields(db, run.run_id):
        return REDUCED_COLUMNS, run.input_delimiter or ",", True
    return run.input_columns, run.input_delimiter or ",", False


def _fields(row: ExportRow, reduced: bool) -> list[str]:
    return [row.image_url, row.caption] if reduced else row.input_fields or []


def export_run(db: ResultsDB, run_id: str, path: str | Path) -> Export:
    """Write the run to ``path``: Parquet for ``.parquet``, otherwise the scored CSV."""
    run = get_run(db, run_id)
    path = Path(path)
    columns, delimiter, reduced = _layout(db, run)
    rows = export_rows(db, run_id)
    if path.suffix.lower() == ".parquet":
        count = _write_parquet(path, columns, rows, reduced)
    else:
        count = 0
        with scored_csv_writer(path, delimiter) as writer:
            writer.writerow(scored_header(columns))
            for row in rows:
                writer.writerow(scored_fields(_fields(row, reduced), row.similarity, row.error))
                count += 1
    return Export(run, path, count, reduced)


def _write_parquet(path: Path, columns: list[str], rows: Iterator[ExportRow],
                   reduced: bool) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("Parquet export needs pyarrow: pip install pyarrow.") from None
    schema = pa.schema([*(pa.field(name, pa.string()) for name in columns),
                        pa.field("similarity", pa.float64()), pa.field("error", pa.string())])
    count = 0
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for batch in batched(rows, PARQUET_BATCH):
            values = [_fields(row, reduced) for row in batch]
            arrays = [pa.array([v[i] for v in values], pa.string())
                      for i in range(len(columns))]
            arrays.append(pa.array([r.similarity for r in batch], pa.float64()))
            arrays.append(pa.array([r.error for r in batch], pa.string()))
            writer.write_batch(pa.record_batch(arrays, schema=schema))
            count += len(batch)
    return count
