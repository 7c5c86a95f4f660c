"""The scored CSV's format: the input's columns, unchanged and in order, then ``similarity`` (4
decimals, empty on error) and ``error`` (empty on success).

Both writers of that file use it, finalize (from the object store) and ``results export`` (from
the database), so the two cannot drift. Finalize writes a chunk at a time from its columns
(``RowWriter.write_columns``): the same bytes as ``writerow`` row by row, built by Arrow compute.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
        self.handle, self.delimiter = handle, delimiter

    def writerow(self, fields: Sequence[str]) -> None:
        writer = self._quoted if any("\r" in field for field in fields) else self._plain
        writer.writerow(fields)

    def write_columns(self, fields: pa.ListArray, similarity: pa.Array, error: pa.Array) -> None:
        """Rows whose input values are ``fields`` (one list per row, all of one length), as
        ``writerow(scored_fields(...))`` writes them one by one."""
        width = len(fields[0]) if len(fields) else 0
        if width == 0 or pc.any(pc.not_equal(pc.list_value_length(fields), width)).as_py():
            for values, score, code in zip(fields.to_pylist(), similarity.to_pylist(),
                                           error.to_pylist(), strict=True):
                self.writerow(scored_fields(values, score, code))
            return
        flat = fields.flatten()
        columns = [flat.take(np.arange(i, len(flat), width)) for i in range(width)]
        columns += [similarity_text(similarity), error.fill_null("")]
        self.handle.write(csv_text(columns, self.delimiter))


def similarity_text(similarity: pa.Array) -> pa.Array:
    """``f"{similarity:.4f}"`` of each value (empty when null); values are already rounded to
    4 decimals in 0..1, so the digits are those of ``rint(value * 10_000)``."""
    tenths = np.rint(similarity.fill_null(0.0).to_numpy(zero_copy_only=False) * 10_000)
    tenths = tenths.astype(np.int64)
    whole = pa.array(tenths // 10_000).cast(pa.string())
    fraction = pc.utf8_lpad(pa.array(tenths % 10_000).cast(pa.string()), 4, "0")
    return pc.if_else(similarity.is_null(), "", pc.binary_join_element_wise(whole, fraction, "."))


def _quoted(values: pa.Array) -> pa.Array:
    return pc.binary_join_element_wise('"', pc.replace_substring(values, '"', '""'), '"', "")


def _special(delimiter: str) -> str:
    """What makes ``csv.writer`` quote a value (QUOTE_MINIMAL, LF line ends), as a pattern."""
    return "[" + ("\\t" if delimiter == "\t" else delimiter) + '"\\n]'


def csv_text(columns: list[pa.Array], delimiter: str) -> str:
    """Rows of string columns as ``RowWriter.writerow`` writes them: a value holding the
    delimiter, a quote or LF is quoted; every value of a row holding a CR is."""
    has_cr = functools.reduce(pc.or_, (pc.match_substring(c, "\r") for c in columns))
    cells = [pc.if_else(pc.or_(has_cr, pc.match_substring_regex(c, _special(delimiter))),
                        _quoted(c), c) for c in columns]
    lines = pc.binary_join_element_wise(*cells, delimiter)
    lines = pc.binary_join_element_wise(lines, "", "\n")
    whole = pc.binary_join(pa.ListArray.from_arrays([0, len(lines)], lines), "")
    return whole[0].as_py()


@contextmanager
def scored_csv_writer(output: str | Path, delimiter: str) -> Iterator[RowWriter]:
    """A CSV writer whose file appears at ``output`` whole, and only if the block succeeds."""
    with atomic_text(output, newline="") as handle:
        yield RowWriter(handle, delimiter)
