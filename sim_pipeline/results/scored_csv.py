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
from typing import TextIO

from sim_pipeline.core.files import atomic_text


def scored_header(columns: Sequence[str]) -> list[str]:
    return [*columns, "similarity", "error"]


def scored_fields(fields: Sequence[str], similarity: float | None,
                  error: str | None) -> list[str]:
    """One output row: the input values unchanged, the similarity (4 decimals), the error code.

    ``sim-pipeline results export`` writes its rows with this too, so the two files cannot drift.
    """
    return [*fields, "" if similarity is None else f"{similarity:.4f}", error or ""]


class RowWriter:
    """``csv.writer`` with LF line ends that also quotes a row holding a carriage return.

    Python's writer quotes only the characters of its line terminator (LF here), so a value with
    a lone CR would be written bare and read back as a line end, splitting its row in two. Such a
    row is written with every field quoted instead; all other rows are written as usual.
    """

    def __init__(self, handle: TextIO, delimiter: str) -> None:
        self._plain = csv.writer(handle, delimiter=delimiter, lineterminator="\n")
        self._quoted = csv.writer(handle, delimiter=delimiter, lineterminator="\n",
                                  quoting=csv.QUOTE_ALL)

    def writerow(self, fields: Sequence[str]) -> None:
        writer = self._quoted if any("\r" in field for field in fields) else self._plain
        writer.writerow(fields)


@contextmanager
def scored_csv_writer(output: str | Path, delimiter: str) -> Iterator[RowWriter]:
    """A CSV writer whose file appears at ``output`` whole, and only if the block succeeds."""
    with atomic_text(output, newline="") as handle:
        yield RowWriter(handle, delimiter)
