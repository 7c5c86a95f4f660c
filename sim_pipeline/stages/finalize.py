"""Stage 6, finalize: the scored CSV, one output row per input row, in input order.

Every input column comes back unchanged and in order, followed by ``similarity`` (empty on error)
and ``error`` (empty on success). Chunks are streamed one at a time, each written from its columns;
the file appears atomically.
"""

from __future__ import annotations

from pathlib import Path

from sim_pipeline.core.config import Settings
from sim_pipeline.core.store import ObjectStore
from sim_pipeline.results.scored_csv import scored_csv_writer, scored_header
from sim_pipeline.stages.plan import RunPlan, read_chunk_table
from sim_pipeline.stages.score import read_result_table


def default_output_path(source: str | Path) -> Path:
    source = Path(source)
    return source.with_name(f"{source.stem}_scored{source.suffix or '.csv'}")


def write_scored_csv(plan: RunPlan, store: ObjectStore, settings: Settings,
                     output: str | Path) -> Path:
    with scored_csv_writer(output, plan.delimiter) as writer:
        writer.writerow(scored_header(plan.columns))
        for chunk in plan.chunks:
            fields = read_chunk_table(store, chunk)["fields"].combine_chunks()
            results = read_result_table(store, chunk, settings)
            writer.write_columns(fields, results["similarity"].combine_chunks(),
                                 results["error"].combine_chunks())
    return Path(output)
