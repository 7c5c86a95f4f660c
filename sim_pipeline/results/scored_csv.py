"""The scored CSV's format: the input's columns, unchanged and in order, then ``similarity`` (4
decimals, empty on error) and ``error`` (empty on success).

Both writers of that file use it, finalize (from the object store) and ``results export`` (from
the database), so the two cannot drift.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sim_pipeline.core.files import atomic_text


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
    with atomic_text(output, newline="") as handle:
        yield csv.writer(handle, delimiter=delimiter, lineterminator="\n")
