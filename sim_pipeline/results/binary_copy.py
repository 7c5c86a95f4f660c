"""PostgreSQL's binary COPY format, built from Arrow columns with no Python object per row.

A binary COPY row is a 16-bit field count, then per field a 32-bit length (-1: NULL) and the
value's bytes (big-endian numbers, UTF-8 text, microseconds since 2000-01-01 for timestamps).
Each column is encoded as a whole (numpy for numbers, Arrow compute for text) and the columns are
joined row by row by ``binary_join_element_wise``, so a chunk of 10,000 rows is a handful of
array operations. The stream starts with ``SIGNATURE`` and ends with ``TRAILER``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SIGNATURE = b"PGCOPY\n\xff\r\n\0" + b"\0\0\0\0" + b"\0\0\0\0"  # and no flags, no extension
TRAILER = b"\xff\xff"
NULL = b"\xff\xff\xff\xff"
POSTGRES_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
Field = pa.Array | pa.Scalar


def _fixed(values: np.ndarray, width: int) -> pa.Array:
    """Big-endian numbers as ``binary`` values of ``width`` bytes each."""
    data = pa.py_buffer(values.tobytes())
    return pa.Array.from_buffers(pa.binary(width), len(values), [None, data]).cast(pa.binary())


def text_field(values: pa.Array) -> pa.Array:
    """A text column (nulls as NULL): length, then UTF-8 bytes."""
    lengths = pc.binary_length(values).fill_null(-1).to_numpy(zero_copy_only=False)
    prefix = _fixed(lengths.astype(">i4"), 4)
    return pc.binary_join_element_wise(prefix, values.cast(pa.binary()).fill_null(b""), b"")


def float8_field(values: np.ndarray, null: np.ndarray) -> pa.Array:
    """A float8 column; ``null`` marks the rows that are NULL."""
    payload = _fixed(values.astype(">f8"), 8)
    prefix = pa.array(np.where(null, NULL, struct.pack(">i", 8)).tolist(), pa.binary())
    return pc.binary_join_element_wise(prefix, pc.if_else(pa.array(null), b"", payload), b"")


def int8_field(values: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(struct.pack(">i", 8), _fixed(values.astype(">i8"), 8),
                                       b"")


def text_constant(value: str | None) -> pa.Scalar:
    data = NULL if value is None else struct.pack(">i", len(value.encode())) + value.encode()
    return pa.scalar(data, pa.binary())


def timestamptz_constant(moment: datetime) -> pa.Scalar:
    micros = (moment - POSTGRES_EPOCH) // timedelta(microseconds=1)
    return pa.scalar(struct.pack(">iq", 8, micros), pa.binary())


def copy_rows(fields: Sequence[Field]) -> bytes:
    """The rows of a binary COPY (no signature, no trailer) whose fields are ``fields``, each an
    encoded column or one encoded value for every row."""
    count = pa.scalar(struct.pack(">h", len(fields)), pa.binary())
    rows = pc.binary_join_element_wise(count, *fields, b"")
    if isinstance(rows, pa.ChunkedArray):
        rows = rows.combine_chunks()
    offsets = np.frombuffer(rows.buffers()[1], dtype=np.int32)[rows.offset:rows.offset + len(rows)
                                                                + 1]
    return rows.buffers()[2].to_pybytes()[offsets[0]:offsets[-1]]
