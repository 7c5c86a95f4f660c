"""Stage 6, finalize: the scored CSV, one output row per input row, in input order.

Every input column comes back unchanged and in order, followed by ``similarity`` (empty on error)
and ``error`` (empty on success). Chunks are streamed one at a time; the file appears atomically.
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

from sim_pipeline.config import Settings
from sim_pipeline.plan import RunPlan, read_chunk_rows
from sim_pipeline.score import read_results
from sim_pipeline.store import ObjectStore


def default_output_path(source: str | Path) -> Path:
    source = Path(source)
    return source.with_name(f"{source.stem}_scored{source.suffix or '.csv'}")


def write_scored_csv(plan: RunPlan, store: ObjectStore, settings: Settings,
                     output: str | Path) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, delimiter=plan.delimiter, lineterminator="\n")
            writer.writerow([*plan.columns, "similarity", "error"])
            for chunk in plan.chunks:
                rows = read_chunk_rows(store, chunk)
                scored = read_results(store, chunk, settings)
                for row, result in zip(rows, scored, strict=True):
                    similarity = "" if result.similarity is None else f"{result.similarity:.4f}"
                    writer.writerow([*row.fields, similarity, result.error or ""])
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return output
