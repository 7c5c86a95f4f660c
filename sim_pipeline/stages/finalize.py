"""Stage 6, finalize: the scored CSV, one output row per input row, in input order.

Every input column comes back unchanged and in order, followed by ``similarity`` (empty on error)
and ``error`` (empty on success). Chunks are streamed one at a time, each written from its columns;
a row past the row limit is streamed from the copy plan kept of it (``long_rows``). The file
appears atomically.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from sim_pipeline.core import errors
from sim_pipeline.core.config import Settings
from sim_pipeline.core.store import ObjectStore
from sim_pipeline.results.scored_csv import RowWriter, scored_csv_writer, scored_header
from sim_pipeline.stages.long_rows import Spill, long_row_text
from sim_pipeline.stages.plan import RunPlan, read_chunk_table
from sim_pipeline.stages.score import read_result_table


def default_output_path(source: str | Path) -> Path:
    source = Path(source)
    return source.with_name(f"{source.stem}_scored{source.suffix or '.csv'}")


def write_scored_csv(plan: RunPlan, store: ObjectStore, settings: Settings,
                     output: str | Path) -> Path:
    spill = Spill(store, plan.run_id, plan.input_digest)
    with scored_csv_writer(output, plan.delimiter) as writer:
        writer.writerow(scored_header(plan.columns))
        for chunk in plan.chunks:
            rows = read_chunk_table(store, chunk)
            results = read_result_table(store, chunk, settings)
            write_chunk(writer, spill, len(plan.columns), rows, results)
    return Path(output)


def write_chunk(writer: RowWriter, spill: Spill, width: int, rows: pa.Table,
                results: pa.Table) -> None:
    """The chunk's rows from its columns; each long row (``field_too_long``) from its kept copy
    where plan kept one, else from its (blank) columns."""
    fields = rows["fields"].combine_chunks()
    similarity = results["similarity"].combine_chunks()
    error = results["error"].combine_chunks()
    start = 0
    long_rows = pc.indices_nonzero(pc.equal(rows["error"], errors.FIELD_TOO_LONG).fill_null(False))
    for at in long_rows.to_pylist():
        text = long_row_text(spill, rows["row"][at].as_py(), width, writer.delimiter)
        if text is None:
            continue
        writer.write_columns(fields.slice(start, at - start), similarity.slice(start, at - start),
                             error.slice(start, at - start))
        writer.write_text(text, similarity[at].as_py(), error[at].as_py())
        start = at + 1
    writer.write_columns(fields.slice(start), similarity.slice(start), error.slice(start))
