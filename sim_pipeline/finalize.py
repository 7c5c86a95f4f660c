"""Stage 6, finalize: the scored CSV, one output row per input row, in input order.

Every input column comes back unchanged and in order, followed by ``similarity`` (empty on error)
and ``error`` (empty on success). Chunks are streamed one at a time; the file appears atomically.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sim_pipeline.config import Settings
from sim_pipeline.plan import RunPlan, read_chunk_rows
from sim_pipeline.score import read_results
from sim_pipeline.store import ObjectStore


def default_output_path(source: str | Path) -> Path:
    source = Path(source)
    return source.with_name(f"{source.stem}_scored{source.suffix or '.csv'}")


def scored_header(columns: Sequence[str]) -> list[str]:
    return [*columns, "similarity", "error"]


def scored_fields(fields: Sequence[str], similarity: float | None,
                  error: str | None) -> list[str]:
    """One output row: the input values unchanged, the similarity (4 decimals), the error code.

    ``sim-pipeline results export`` writes its rows with this too, so the two files cannot drift.
    """
    return [*fields, "" if similarity is None else f"{similarity:.4f}", error or ""]


@contextmanager
def scored_csv_writer(output: str | Path, delimiter: str) -> Iterator[Any]:
    """A ``csv.writer`` whose file appears at ``output`` whole, and only if the block succeeds."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as handle:
            yield csv.writer(handle, delimiter=delimiter, lineterminator="\n")
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_scored_csv(plan: RunPlan, store: ObjectStore, settings: Settings,
                     output: str | Path) -> Path:
    with scored_csv_writer(output, plan.delimiter) as writer:
        writer.writerow(scored_header(plan.columns))
        for chunk in plan.chunks:
            rows = read_chunk_rows(store, chunk)
            scored = read_results(store, chunk, settings)
            for row, result in zip(rows, scored, strict=True):
                writer.writerow(scored_fields(row.fields, result.similarity, result.error))
    return Path(output)
