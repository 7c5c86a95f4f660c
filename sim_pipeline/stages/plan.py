"""Stage 1, plan: stream the input CSV into normalised chunks in the object store.

Each chunk holds its rows verbatim (so finalize can reproduce every input column) plus the fields
the later stages need: the row number, the URL and its hash, the caption, and any input error.
Only one chunk is ever held in memory.

One bad row costs one row: a file is refused as a whole only when it is no CSV text at all
(``check_input_file``). Inside the file, bytes that are not UTF-8 become U+FFFD (the row gets
``invalid_encoding`` when its URL or caption held them), a row longer than ``MAX_ROW_CHARS``
gets ``field_too_long``. A caption reaches the model exactly as written (control characters and
surrounding spaces included, as the family's own processor would get it); NUL is only a storage
matter, handled where rows are stored.

Chunks are Arrow IPC files, one column per field (``CHUNK_SCHEMA``): later stages read the columns
they need as arrays, and no value (a line separator, NUL) can change their framing. Checking and
hashing a URL or caption is done once per distinct value of a chunk (``Memo``): a million rows
over a few thousand images cost a few thousand URL checks per chunk, not a million.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import io
import itertools
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from sim_pipeline.core import errors, repairs
from sim_pipeline.core.config import Settings
from sim_pipeline.core.errors import UserError
from sim_pipeline.core.layout import ChunkRef, current_plan_key, manifest_key, sha256_hex
from sim_pipeline.core.store import (
    IntegrityError,
    MissingObject,
    ObjectStore,
    read_json,
    sha256_bytes,
    write_json,
)
from sim_pipeline.core.streams import batched
from sim_pipeline.core.urls import url_problem
from sim_pipeline.stages.long_rows import LongRow, Spill

URL_COLUMNS = ("url", "image_url", "image", "img_url", "link")
CAPTION_COLUMNS = ("caption", "text", "caption_text", "title")
MAX_ROW_CHARS = errors.MAX_ROW_CHARS  # a longer row (its fields, line breaks included) costs it
HEAD_BYTES = 65536  # what check_input_file reads to tell a CSV from something else
MAX_BINARY_SHARE = 0.3  # of the head after the header line: NUL or undecodable bytes
_PIECE = 1 << 20  # characters read at a time: a huge line is never in memory whole
# The csv module's own cap only stops crafted rows whose shape (see _skeleton) stays huge.
csv.field_size_limit(4 * MAX_ROW_CHARS)
_SURROGATE = re.compile("[\ud800-\udfff]")  # undecodable bytes, as surrogateescape reads them
_QUOTES = re.compile('""+')
CHUNK_SCHEMA = pa.schema([
    ("row", pa.int64()), ("url", pa.string()), ("url_hash", pa.string()),
    ("caption", pa.string()), ("caption_hash", pa.string()), ("error", pa.string()),
    ("fields", pa.list_(pa.string())),
])
MEMO_SIZE = 1 << 16  # distinct URLs (and captions) whose checks and hashes are remembered
MEMO_CHARS = 4096  # a longer value is checked each time it comes: the memo never holds one
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
         (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


@dataclass(frozen=True)
class InputRow:
    """One input row, normalised. ``fields`` are the row's values exactly as read."""

    row: int
    url: str
    url_hash: str | None
    caption: str
    error: str | None
    fields: list[str]

    def to_json(self) -> str:
        """ASCII only: no value can put a line break (U+2028, U+0085, ...) into a JSON line."""
        return json.dumps(self.__dict__, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> InputRow:
        return cls(**json.loads(line))


@dataclass(frozen=True)
class RunPlan:
    """What plan produced: the run's columns and its chunk descriptors."""

    run_id: str
    input_digest: str
    source: str
    columns: list[str]
    url_column: str
    caption_column: str
    delimiter: str
    rows: int
    chunks: list[ChunkRef]

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["chunks"] = [c.to_dict() for c in self.chunks]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunPlan:
        return cls(**{**data, "chunks": [ChunkRef.from_dict(c) for c in data["chunks"]]})


def repaired(text: str) -> tuple[str, bool]:
    """``text`` with each undecodable byte (or any lone surrogate) as U+FFFD; and whether any was.

    The file is read with ``surrogateescape``, so a byte that is not UTF-8 arrives as a lone
    surrogate; no valid text holds one, and no later step (hashing, JSON, SQL) could encode it.
    """
    if text.isascii():
        return text, False
    fixed, count = _SURROGATE.subn("\ufffd", text)
    return fixed, count > 0


def url_facts(raw: str) -> tuple[str, bool, str | None, str | None]:
    """The URL as scored (repaired, stripped), whether it held undecodable bytes, its problem
    code, its hash."""
    url, bad = repaired(raw)
    url = url.strip()
    return url, bad, url_problem(url), sha256_hex(url) if url else None


def caption_facts(raw: str) -> tuple[str, bool, str]:
    """The caption as scored, whether it held undecodable bytes, and its hash. The model gets
    the caption as written: tokenizers keep control characters (as byte tokens, say), so
    replacing them would score another text than the reference does."""
    caption, bad = repaired(raw)
    return caption, bad, sha256_hex(caption)


class Memo(dict[str, Any]):
    """Facts about distinct values: inputs repeat their URLs and captions, and each check or
    hash is pure, so it runs once per distinct value. Bounded: it starts over past ``MEMO_SIZE``
    values, and a value longer than ``MEMO_CHARS`` is never kept."""

    def __init__(self, facts: Any) -> None:
        super().__init__()
        self.facts = facts

    def __missing__(self, raw: str) -> Any:
        found = self.facts(raw)
        if len(raw) <= MEMO_CHARS:
            if len(self) >= MEMO_SIZE:
                self.clear()
            self[raw] = found
        return found


def row_error(bad_url: bool, bad_caption: bool, problem: str | None, caption: str) -> str | None:
    """A row's input code: undecodable bytes first, then the URL's problem, then no caption."""
    if bad_url or bad_caption:
        return errors.INVALID_ENCODING
    return problem or (None if caption.strip() else errors.MISSING_CAPTION)


def kept_fields(fields: list[str]) -> list[str]:
    """The row's values as kept: undecodable bytes as U+FFFD."""
    return fields if all(map(str.isascii, fields)) else [repaired(f)[0] for f in fields]


def normalise_row(row: int, url: str, caption: str, fields: list[str]) -> InputRow:
    """A row's URL and caption checked and cleaned; its fields kept (undecodable bytes as
    U+FFFD). Never raises, whatever the values hold."""
    url, bad_url, problem, url_hash = url_facts(url)
    caption, bad_caption, _ = caption_facts(caption)
    return InputRow(row, url, url_hash, caption, row_error(bad_url, bad_caption, problem, caption),
                    kept_fields(fields))


def find_column(header: Sequence[str], candidates: Sequence[str], override: str | None,
                what: str) -> int:
    """Index of the URL or caption column: the override if given, else the first known name."""
    lowered = [h.strip().lower() for h in header]
    wanted = [override.strip().lower()] if override else list(candidates)
    for name in wanted:
        if name in lowered:
            return lowered.index(name)
    hint = f"--{what}-column" if override is None else "the column name"
    raise UserError(
        f"No {what} column found (looked for {', '.join(wanted)}; the file has "
        f"{', '.join(repr(h) for h in header) or 'no columns'}); check {hint}."
    )


def delimiter_for(path: Path) -> str:
    return "\t" if path.suffix.lower() in (".tsv", ".tab") else ","


def file_digest(path: Path, *extra: str) -> str:
    """sha256 of the file's bytes and of any settings that change the plan."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    for item in extra:
        digest.update(b"\0" + item.encode("utf-8"))
    return digest.hexdigest()


def input_digest(path: Path, settings: Settings) -> str:
    """Identifies a plan: the file's bytes and the settings that shape its chunks."""
    return file_digest(path, str(settings.chunk_size), settings.url_column or "",
                       settings.caption_column or "")[:16]


def default_run_id(path: Path, settings: Settings) -> str:
    """Content-addressed: the same file with the same settings resumes the same run."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", path.stem).strip("-")[:40] or "input"
    digest = file_digest(path, settings.model, settings.precision, str(settings.chunk_size),
                         settings.url_column or "", settings.caption_column or "")
    return f"{stem}-{digest[:12]}"


def check_input_file(path: Path) -> None:
    """Refuse, in one sentence, a file that is no CSV text at all; a bad row is not such a file."""
    if not path.exists():
        raise UserError(f"Input file {path} does not exist.")
    if not path.is_file():
        raise UserError(f"Input {path} is not a file.")
    with path.open("rb") as handle:
        head = handle.read(HEAD_BYTES)
    reason = not_text(head)
    if reason:
        raise UserError(f"Input file {path} is not a CSV file: {reason}.")


def check_input(path: Path, settings: Settings) -> None:
    """Refuse, in one sentence, an input that cannot be planned (no CSV text, no header row, no
    URL or caption column) from its first lines, before any model, network or database work."""
    rows = read_rows(path, settings)[3]
    next(rows, None)  # the first row; closing the reader then closes the file
    rows.close()


def not_text(head: bytes) -> str | None:
    """Why the first bytes of a file cannot start a UTF-8 CSV, or None when they can.

    Only the header line must be clean: an image renamed ``.csv`` or UTF-16 text without a BOM
    fails there (undecodable bytes, NUL). Past it, only a head that is mostly NUL or undecodable
    bytes is refused; single bad bytes are left to the rows they are in.
    """
    for bom, name in _BOMS:
        if head.startswith(bom):
            return f"it is {name} text; save it as UTF-8"
    first_line = re.split(b"[\r\n]", head, maxsplit=1)[0]
    whole_line = len(first_line) < len(head)
    if b"\0" in first_line or _SURROGATE.search(_decode_part(first_line, whole_line)):
        return "its first line holds binary data or text that is not UTF-8"
    rest = head[len(first_line):]
    if len(rest) >= 1024:
        text = _decode_part(rest)
        bad = len(_SURROGATE.findall(text)) + text.count("\0")
        if bad > MAX_BINARY_SHARE * len(rest):
            return f"more than {MAX_BINARY_SHARE:.0%} of its first 64 KB is binary data"
    return None


def _decode_part(data: bytes, final: bool = False) -> str:
    """UTF-8 with undecodable bytes as lone surrogates; unless ``final``, a character cut at the
    end (where the head was cut) is dropped, not counted as undecodable."""
    return codecs.getincrementaldecoder("utf-8")("surrogateescape").decode(data, final=final)


class CsvRow(NamedTuple):
    """A parsed row; ``too_long``: longer than ``MAX_ROW_CHARS``, its values not kept."""

    fields: list[str]
    too_long: bool = False


class RowLines:
    """The file's lines for ``csv.reader``, holding at most ``limit`` characters of one row.

    Past the limit, the rest of the row is passed on as its skeleton (``_skeleton``), so the csv
    parser still ends the row exactly where it ends, and the next row is read whole again. The
    caller says where a row ends (``next_row``): the reader pulls lines only until a row is done.

    Given a ``spill``, a row's lines are held until it ends or passes the limit; then they and
    the rest of the row go to the store as read (``LongRow``), so finalize can give it back.
    """

    def __init__(self, handle: TextIO, delimiter: str, limit: int = MAX_ROW_CHARS) -> None:
        self.handle, self.limit, self.delimiter = handle, limit, delimiter
        self.ordinary = re.compile(f'[^"{re.escape(delimiter)}\r\n]+')
        self.row_chars = 0
        self.too_long = False
        self.spill: Spill | None = None
        self.row = -1  # the header; data rows are numbered from 0
        self.held: list[str] = []
        self.long_row: LongRow | None = None

    def __iter__(self) -> RowLines:
        return self

    def __next__(self) -> str:
        piece = self.handle.readline(_PIECE)
        self.row_chars += len(piece)
        if len(piece) < _PIECE and piece and self.row_chars <= self.limit:
            if self.spill is not None:
                self.held.append(piece)
            return piece  # the usual line: whole, and its row still short
        return self._long_line(piece)

    def _long_line(self, piece: str) -> str:
        """The rest of a line longer than ``_PIECE`` or of a row past the limit, a piece at a
        time; past the limit each piece is cut to its skeleton."""
        self.row_chars -= len(piece)
        pieces: list[str] = []
        while piece:
            self.row_chars += len(piece)
            whole = len(piece) < _PIECE or piece.endswith("\n")
            if self.row_chars > self.limit:
                self.too_long = True
                skeleton = _skeleton(piece, self.ordinary)
                self._keep_long(piece, skeleton)
                piece = skeleton
            elif self.spill is not None:
                self.held.append(piece)
            pieces.append(piece)
            if whole:
                break
            piece = self.handle.readline(_PIECE)
        if not pieces:
            raise StopIteration
        return "".join(pieces)

    def _keep_long(self, piece: str, skeleton: str) -> None:
        """Past the limit: the held lines, then each piece, go to the store as read."""
        if self.spill is None:
            return
        if self.long_row is None:
            self.long_row = LongRow(self.spill, self.row, self.delimiter)
            for line in self.held:
                self.long_row.write(line, _skeleton(line, self.ordinary))
            self.held.clear()
        self.long_row.write(piece, skeleton)

    def end_row(self, fields: int) -> None:
        """The csv parser ended the row with ``fields`` values: a long row's last part is kept."""
        if self.long_row is not None:
            self.long_row.finish(fields)

    def next_row(self) -> None:
        self.row_chars, self.too_long = 0, False
        self.row += 1
        self.held.clear()
        self.long_row = None


def _skeleton(text: str, ordinary: re.Pattern[str]) -> str:
    """``text`` with each run of ``ordinary`` characters (all but quote, delimiter, CR, LF) cut
    to one ``x`` and each run of quotes to one or two: the csv parser goes through the same
    states (field starts and ends, quoting, row end) over it as over ``text``, while the values
    it collects stay small."""
    text = ordinary.sub("x", text)
    return _QUOTES.sub(lambda run: '""' if len(run.group()) % 2 == 0 else '"', text)


def read_rows(path: Path, settings: Settings, spill: Spill | None = None
              ) -> tuple[list[str], int, int, Iterator[CsvRow]]:
    """Open the CSV streaming; return its header, URL and caption indexes, and the row iterator.
    Rows past the limit are kept as read in ``spill`` when one is given (``RowLines``).

    Bytes that are not UTF-8 are read as lone surrogates (``surrogateescape``) and repaired per
    row by ``normalise_row``, so they cost only the row they are in.
    """
    check_input_file(path)
    delimiter = delimiter_for(path)
    handle = path.open(newline="", encoding="utf-8-sig", errors="surrogateescape")
    lines = RowLines(handle, delimiter)
    reader = csv.reader(lines, delimiter=delimiter)
    try:
        header = [repaired(name)[0] for name in next(reader)]
    except StopIteration:
        raise UserError(f"Input file {path} is empty: it needs a header row.") from None
    except csv.Error as error:
        raise UserError(f"Input file {path} is not a readable CSV: {error}.") from None
    if lines.too_long:
        raise UserError(f"Input file {path} has a header row longer than {MAX_ROW_CHARS:,} "
                        "characters; is it a CSV file?")
    lines.next_row()
    lines.spill = spill
    url_index = find_column(header, URL_COLUMNS, settings.url_column, "url")
    caption_index = find_column(header, CAPTION_COLUMNS, settings.caption_column, "caption")
    return header, url_index, caption_index, _parsed_rows(path, handle, lines, reader)


def _parsed_rows(path: Path, handle: TextIO, lines: RowLines, reader: Any) -> Iterator[CsvRow]:
    """The rows ``reader`` parses from ``lines``; the file is closed when they end."""
    with handle:
        try:
            for fields in reader:
                lines.end_row(len(fields))
                yield CsvRow(fields, lines.too_long)
                lines.next_row()
        except csv.Error as error:  # only a crafted row (see csv.field_size_limit above)
            raise UserError(f"Input file {path} cannot be read as CSV near line "
                            f"{reader.line_num}: {error}.") from None


class CountedText:
    """A text handle that counts the bytes of the lines read from it: read with
    ``surrogateescape``, each line encodes back to exactly the bytes it was read from."""

    def __init__(self, handle: TextIO) -> None:
        self.handle = handle
        self.bytes = 0

    def readline(self, limit: int = -1) -> str:
        line = self.handle.readline(limit)
        self.bytes += len(line.encode("utf-8", "surrogateescape"))
        return line

    def __enter__(self) -> CountedText:
        return self

    def __exit__(self, *_: object) -> None:
        self.handle.close()

    @classmethod
    def over(cls, raw: BinaryIO) -> CountedText:
        """The counting text handle over a binary file, decoded as ``read_rows`` decodes it."""
        return cls(io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline=""))


def rows_from(path: Path, offset: int, first_row: int, spill: Spill | None = None
              ) -> tuple[Iterator[CsvRow], CountedText]:
    """The rows of ``path`` from byte ``offset`` (the start of a line that starts row
    ``first_row``) to the end, read exactly as ``read_rows`` reads them; and the handle that
    counts the bytes they took."""
    delimiter = delimiter_for(path)
    raw = path.open("rb")
    raw.seek(offset)
    handle = CountedText.over(raw)
    lines = RowLines(handle, delimiter)  # type: ignore[arg-type]
    lines.row = first_row - 1
    lines.next_row()
    lines.spill = spill
    rows = _parsed_rows(path, handle, lines, csv.reader(lines, delimiter=delimiter))  # type: ignore[arg-type]
    return rows, handle


class ChunkColumns:
    """One chunk's columns (``CHUNK_SCHEMA``) from rows already normalised (``normalise_row``)."""

    def __init__(self) -> None:
        self.rows: list[InputRow] = []
        self.hashes = Memo(sha256_hex)

    def add_row(self, row: InputRow) -> None:
        self.rows.append(row)

    def table(self) -> pa.Table:
        rows = self.rows
        return _table([r.row for r in rows], [r.url for r in rows], [r.url_hash for r in rows],
                      [r.caption for r in rows], [self.hashes[r.caption] for r in rows],
                      [r.error for r in rows], [r.fields for r in rows])


def csv_chunks(header: list[str], url_index: int, caption_index: int, rows: Iterable[CsvRow],
               chunk_size: int, first: int = 0, memos: tuple[Memo, Memo] | None = None
               ) -> Iterator[pa.Table]:
    """The parsed rows, numbered from ``first``, as chunk tables; a row's problem becomes its
    code."""
    width = len(header)
    empty = [""] * width
    number = first
    url_memo, caption_memo = memos or (Memo(url_facts), Memo(caption_facts))  # for all chunks
    for batch in batched(rows, chunk_size):
        values: list[list[str]] = []
        codes: list[str | None] = []
        for fields, too_long in batch:
            count = len(fields)
            if too_long:
                values.append(empty)
                codes.append(errors.FIELD_TOO_LONG)
            elif count == width:
                values.append(fields)
                codes.append(None)
            elif count < width:
                values.append(fields + empty[count:])
                codes.append(None)
            else:
                values.append(fields[:width])
                codes.append(errors.MALFORMED_ROW)
        yield _columns(number, values, codes, url_index, caption_index, url_memo, caption_memo)
        number += len(values)


BLOCK_BYTES = 1 << 21  # what the columnar reader parses at a time (whole lines): on 1M rows 2 MB
# was about as fast as 1 or 4 MB and twice as fast as 16 MB, at half the peak memory of 16 MB


def csv_tables(path: Path, settings: Settings, spill: Spill | None = None, fast: bool = True
               ) -> tuple[list[str], int, int, Iterator[pa.Table]]:
    """The input's header, URL and caption indexes, and its chunk tables.

    Blocks of plain lines (quotes only around whole one-line fields, no NUL, lone CR or blank
    line, valid UTF-8, each line with the header's field count; ``_plain``) are parsed by
    pyarrow's CSV reader and checked as columns: Python's ``csv`` module splits such lines the
    same way. From the first block that is not plain on,
    the rows are read by ``read_rows``'s parser, so every row is classified as docs/input.md
    says; ``fast=False`` reads the whole file that way.
    """
    header, url_index, caption_index, rows = read_rows(path, settings)
    next(rows, None)  # the first row; closing the reader then closes the file
    rows.close()
    if not fast:
        rows = read_rows(path, settings, spill)[3]
        return header, url_index, caption_index, csv_chunks(
            header, url_index, caption_index, rows, settings.chunk_size)
    return header, url_index, caption_index, _mixed_chunks(
        path, header, url_index, caption_index, _data_start(path), settings.chunk_size, spill)


def _data_start(path: Path) -> int:
    """The byte offset where the first data row starts: after the header row, as ``read_rows``
    reads it (a byte-order mark first, quoted names, any line end)."""
    delimiter = delimiter_for(path)
    with path.open("rb") as raw:
        bom = len(codecs.BOM_UTF8) if raw.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8 else 0
        raw.seek(bom)
        handle = CountedText.over(raw)
        next(csv.reader(RowLines(handle, delimiter), delimiter=delimiter))  # type: ignore[arg-type]
        return bom + handle.bytes


def _quoted_field(delimiter: str) -> re.Pattern[bytes]:
    """A quoted field as RFC 4180 writes it, on one line: a quote at the field's start, doubled
    quotes inside, the closing quote right before a delimiter or the line end."""
    sep = re.escape(delimiter.encode())
    return re.compile(rb'(?<![^' + sep + rb'\n])"[^"\r\n]*(?:""[^"\r\n]*)*"(?=[' + sep
                      + rb'\r\n]|\Z)')


_QUOTED_FIELDS = {d: _quoted_field(d) for d in (",", "\t")}


def _plain(block: bytes, delimiter: str) -> bool:
    """Whether ``block`` (whole lines) is read by pyarrow exactly as by the ``csv`` module:
    quotes only around whole fields on one line (as RFC 4180 writes them), no NUL, each CR part
    of a CRLF, no blank line, no byte-order mark where pyarrow would drop one (at its start), no
    line past ``MAX_ROW_CHARS``, valid UTF-8."""
    if b'"' in block:
        block = _QUOTED_FIELDS[delimiter].sub(b"x", block)
    if b'"' in block or b"\0" in block or b"\n\n" in block or b"\n\r\n" in block:
        return False
    if block.startswith((b"\n", b"\r", codecs.BOM_UTF8)) or \
            block.count(b"\r") != block.count(b"\r\n"):
        return False
    if len(block) > MAX_ROW_CHARS and _longest_line(block) > MAX_ROW_CHARS:
        return False
    if not block.isascii():
        try:
            block.decode("utf-8")
        except UnicodeDecodeError:
            return False
    return True


def _longest_line(block: bytes) -> int:
    """Bytes of the longest line of ``block``, its line end included."""
    ends = np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n"))
    bounds = np.concatenate([[-1], ends, [len(block) - 1]])
    return int(np.diff(bounds).max())


def _line_blocks(path: Path, start: int) -> Iterator[tuple[int, bytes, bool]]:
    """``(offset, bytes, whole)`` from ``start``, about ``BLOCK_BYTES`` at a time: ``whole``
    when the block ends at a line end (or at the end of the file)."""
    with path.open("rb") as handle:
        handle.seek(start)
        carry = b""
        offset = start
        while data := handle.read(BLOCK_BYTES):
            data = carry + data
            cut = data.rfind(b"\n") + 1
            if cut == 0 and len(data) <= MAX_ROW_CHARS:
                carry = data
                continue
            yield offset, data[:cut or len(data)], cut > 0
            offset, carry = offset + (cut or len(data)), data[cut or len(data):]
        if carry:
            yield offset, carry, True


def _plain_table(block: bytes, width: int, delimiter: str) -> pa.Table | None:
    """The block's rows as ``width`` string columns, or None when it is not plain."""
    if not _plain(block, delimiter):
        return None
    uneven: list[object] = []

    def count_uneven(row: object) -> str:
        uneven.append(row)
        return "skip"

    table = pa_csv.read_csv(
        pa.py_buffer(block),
        read_options=pa_csv.ReadOptions(column_names=[str(i) for i in range(width)]),
        parse_options=pa_csv.ParseOptions(delimiter=delimiter, ignore_empty_lines=False,
                                          invalid_row_handler=count_uneven),
        convert_options=pa_csv.ConvertOptions(
            column_types=dict.fromkeys(map(str, range(width)), pa.string()),
            strings_can_be_null=False, null_values=[]))
    return None if uneven else table


PIECE_ROWS = 4096  # rows of a part read by Python's parser, made into columns at a time


def _mixed_chunks(path: Path, header: list[str], url_index: int, caption_index: int,
                  start: int, chunk_size: int, spill: Spill | None) -> Iterator[pa.Table]:
    """Chunk tables of ``chunk_size`` rows from the pieces of ``_pieces``."""
    pending: list[pa.Table] = []
    count = 0
    for piece in _pieces(path, header, url_index, caption_index, start, spill):
        pending.append(piece)
        count += piece.num_rows
        while count >= chunk_size:
            whole = pa.concat_tables(pending)
            yield whole.slice(0, chunk_size).combine_chunks()
            pending = [whole.slice(chunk_size)]
            count -= chunk_size
    if count:
        yield pa.concat_tables(pending).combine_chunks()


def _pieces(path: Path, header: list[str], url_index: int, caption_index: int, start: int,
            spill: Spill | None) -> Iterator[pa.Table]:
    """The rows as tables (``CHUNK_SCHEMA``, numbered from 0): each plain block as columns;
    a block that is not plain by Python's parser, from its start to the first row end at or
    past its end (where the next block starts)."""
    memos = Memo(url_facts), Memo(caption_facts)
    width, delimiter = len(header), delimiter_for(path)
    number, position = 0, start
    while True:
        other: tuple[int, int] | None = None  # offset and size of a block that is not plain
        with contextlib.closing(_line_blocks(path, position)) as blocks:
            for at, block, whole in blocks:
                table = _plain_table(block, width, delimiter) if whole else None
                if table is None:
                    other = at, len(block)
                    break
                yield _plain_columns(number, table, url_index, caption_index, memos)
                number += table.num_rows
        if other is None:
            return
        offset, size = other
        rows, counted = rows_from(path, offset, number, spill)
        for piece in csv_chunks(header, url_index, caption_index, _until(rows, counted, size),
                                PIECE_ROWS, number, memos):
            yield piece
            number += piece.num_rows
        if counted.bytes < size:
            return  # the file ended inside the block
        position = offset + counted.bytes


def _until(rows: Iterator[CsvRow], counted: CountedText, size: int) -> Iterator[CsvRow]:
    """``rows`` up to the first that ends ``size`` bytes or more into them."""
    with contextlib.closing(rows):  # type: ignore[type-var]
        for row in rows:
            yield row
            if counted.bytes >= size:
                return


def _distinct(values: pa.ChunkedArray) -> tuple[pa.Array, list[str]]:
    """Each value's index among the distinct values, and those values."""
    encoded = values.combine_chunks().dictionary_encode()
    return encoded.indices, encoded.dictionary.to_pylist()


def _plain_columns(first: int, raw: pa.Table, url_index: int, caption_index: int,
                   memos: tuple[Memo, Memo]) -> pa.Table:
    """``_columns`` for plain rows held as columns: each distinct URL and caption is checked
    once, and its facts are gathered to the rows (no value of a plain row needs repair)."""
    url_at, urls = _distinct(raw.column(url_index))
    url_memo, caption_memo = memos
    url_facts_ = [url_memo[u] for u in urls]
    caption_at, captions = _distinct(raw.column(caption_index))
    caption_facts_ = [caption_memo[c] for c in captions]
    problem = pa.array([f[2] for f in url_facts_], pa.string()).take(url_at)
    blank = pa.array([None if f[0].strip() else errors.MISSING_CAPTION for f in caption_facts_],
                     pa.string()).take(caption_at)
    count, width = raw.num_rows, raw.num_columns
    flat = pa.concat_arrays([raw.column(i).combine_chunks() for i in range(width)])
    order = (np.arange(width)[None, :] * count + np.arange(count)[:, None]).ravel()
    offsets = pa.array(np.arange(0, count * width + 1, width, dtype=np.int32))
    return pa.Table.from_arrays(
        [pa.array(np.arange(first, first + count), pa.int64()),
         pa.array([f[0] for f in url_facts_], pa.string()).take(url_at),
         pa.array([f[3] for f in url_facts_], pa.string()).take(url_at),
         pa.array([f[0] for f in caption_facts_], pa.string()).take(caption_at),
         pa.array([f[2] for f in caption_facts_], pa.string()).take(caption_at),
         pc.coalesce(problem, blank),
         pa.ListArray.from_arrays(offsets, flat.take(pa.array(order)))], schema=CHUNK_SCHEMA)


def normalise_csv_rows(header: list[str], url_index: int, caption_index: int,
                       rows: Iterable[CsvRow]) -> Iterator[InputRow]:
    """One ``InputRow`` per parsed row, numbered from 0 (for callers that want rows, not chunk
    tables); classified exactly as ``csv_chunks`` classifies them."""
    for table in csv_chunks(header, url_index, caption_index, rows, 4096):
        yield from rows_of(table)


def _columns(first: int, values: list[list[str]], codes: list[str | None], url_index: int,
             caption_index: int, url_memo: Memo, caption_memo: Memo) -> pa.Table:
    """One chunk's table from its rows' values, each distinct URL and caption checked once."""
    urls, bad_urls, problems, url_hashes = zip(
        *map(url_memo.__getitem__, [v[url_index] for v in values]), strict=True)
    captions, bad_captions, caption_hashes = zip(
        *map(caption_memo.__getitem__, [v[caption_index] for v in values]), strict=True)
    row_errors = [code or row_error(bad_url, bad_caption, problem, caption)
                  for code, bad_url, bad_caption, problem, caption
                  in zip(codes, bad_urls, bad_captions, problems, captions, strict=True)]
    kept = [v if "".join(v).isascii() else kept_fields(v) for v in values]
    return _table(list(range(first, first + len(values))), urls, url_hashes, captions,
                  caption_hashes, row_errors, kept)


def _table(rows: Sequence[int], urls: Sequence[str], url_hashes: Sequence[str | None],
           captions: Sequence[str], caption_hashes: Sequence[str],
           row_errors: Sequence[str | None], fields: Sequence[list[str]]) -> pa.Table:
    lengths = pa.array([len(f) for f in fields], pa.int32())
    offsets = pc.cumulative_sum(pa.concat_arrays([pa.array([0], pa.int32()), lengths]))
    values = pa.array(list(itertools.chain.from_iterable(fields)), pa.string())
    return pa.Table.from_arrays(
        [pa.array(rows, pa.int64()), pa.array(urls, pa.string()),
         pa.array(url_hashes, pa.string()), pa.array(captions, pa.string()),
         pa.array(caption_hashes, pa.string()), pa.array(row_errors, pa.string()),
         pa.ListArray.from_arrays(offsets, values)], schema=CHUNK_SCHEMA)


def chunk_table(rows: Iterable[InputRow]) -> pa.Table:
    """Rows already normalised (``normalise_row``) as a chunk's columns."""
    columns = ChunkColumns()
    for row in rows:
        columns.add_row(row)
    return columns.table()


_IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")


def table_bytes(table: pa.Table) -> bytes:
    """An Arrow IPC file (zstd-compressed buffers): a chunk's rows, or its results. A chunk's
    rows repeat their URLs, captions and hashes: compressed, its file is about a ninth of the
    size, cheaper to write, hash and keep than the time it takes to decompress on reading."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema, options=_IPC_OPTIONS) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def bytes_table(data: bytes) -> pa.Table:
    return pa.ipc.open_file(pa.py_buffer(data)).read_all()


def write_chunks(store: ObjectStore, run_id: str, digest: str, rows: Iterable[InputRow],
                 chunk_size: int) -> list[ChunkRef]:
    """Write normalised rows in chunks of ``chunk_size``, one chunk in memory at a time."""
    return write_tables(store, run_id, digest,
                        (chunk_table(batch) for batch in batched(rows, chunk_size)))


def write_tables(store: ObjectStore, run_id: str, digest: str, tables: Iterable[pa.Table]
                 ) -> list[ChunkRef]:
    """Write each chunk table as it comes; returns their descriptors."""
    chunks: list[ChunkRef] = []
    for table in tables:
        data = table_bytes(table)
        ref = ChunkRef(run_id, digest, len(chunks), table["row"][0].as_py(), table.num_rows,
                       sha256_bytes(data))
        store.write_bytes(ref.rows_key, data, ref.sha256)
        chunks.append(ref)
    return chunks


def plan_csv(path: str | Path, store: ObjectStore, settings: Settings, run_id: str) -> RunPlan:
    """Plan a run from a CSV file; the same input planned before is reused as it was."""
    path = Path(path)
    check_input_file(path)
    digest = input_digest(path, settings)
    if not _intact_plan(store, run_id, digest):
        header, url_index, caption_index, tables = csv_tables(
            path, settings, Spill(store, run_id, digest))
        chunks = write_tables(store, run_id, digest, tables)
        plan = RunPlan(run_id, digest, str(path), header, header[url_index],
                       header[caption_index], delimiter_for(path),
                       sum(c.rows for c in chunks), chunks)
        write_json(store, manifest_key(run_id, digest), plan.to_dict())
    write_json(store, current_plan_key(run_id), {"input_digest": digest})
    return load_plan(store, run_id, digest)


def _intact_plan(store: ObjectStore, run_id: str, digest: str) -> bool:
    """Whether the plan written before, and every chunk of it, is there and intact. A damaged
    or partly missing plan is noted and written again (planning is deterministic, so intact
    chunks get the same keys and their later stages' outputs stay valid)."""
    if not store.exists(manifest_key(run_id, digest)):
        return False
    try:
        for chunk in load_plan(store, run_id, digest).chunks:
            _verified_rows(store, chunk)
    except (IntegrityError, MissingObject, KeyError, TypeError, ValueError) as damaged:
        repairs.note("plan", store.uri(manifest_key(run_id, digest)), damaged)
        return False
    return True


def load_plan(store: ObjectStore, run_id: str, digest: str | None = None) -> RunPlan:
    """The run's plan; its newest one unless a digest is given."""
    if digest is None:
        if not store.exists(current_plan_key(run_id)):
            raise UserError(f"Run {run_id} has not been planned in this store.")
        digest = read_json(store, current_plan_key(run_id))["input_digest"]
    return RunPlan.from_dict(read_json(store, manifest_key(run_id, digest)))


def _verified_rows(store: ObjectStore, chunk: ChunkRef) -> bytes:
    data = store.read_bytes(chunk.rows_key)
    if chunk.sha256 is not None and sha256_bytes(data) != chunk.sha256:
        raise IntegrityError(f"{store.uri(chunk.rows_key)} is damaged: rerun the plan "
                             "(`sim-pipeline score` does) to write it again.")
    return data


def read_chunk_table(store: ObjectStore, chunk: ChunkRef) -> pa.Table:
    """The chunk's rows as columns (``CHUNK_SCHEMA``), verified."""
    table = bytes_table(_verified_rows(store, chunk))
    if not table.schema.equals(CHUNK_SCHEMA) or table.num_rows != chunk.rows:
        raise IntegrityError(f"{store.uri(chunk.rows_key)} is not a chunk of this plan: rerun "
                             "the plan (`sim-pipeline score` does) to write it again.")
    return table


def read_chunk_rows(store: ObjectStore, chunk: ChunkRef) -> list[InputRow]:
    """The chunk's rows, verified, one object each (for callers that need rows, not columns)."""
    return rows_of(read_chunk_table(store, chunk))


def rows_of(table: pa.Table) -> list[InputRow]:
    """A chunk table's rows, one object each."""
    columns = table.to_pydict()
    return [InputRow(*values) for values in zip(
        columns["row"], columns["url"], columns["url_hash"], columns["caption"],
        columns["error"], columns["fields"], strict=True)]


def scorable_keys(table: pa.Table) -> tuple[dict[str, str], dict[str, str]]:
    """The chunk's distinct ``{url_hash: url}`` and ``{caption_hash: caption}`` among rows
    without an input error: what fetch and the two embed stages look up, read as columns."""
    ok = table.filter(pc.is_null(table["error"]))
    images = ok.group_by(["url_hash", "url"]).aggregate([])
    texts = ok.group_by(["caption_hash", "caption"]).aggregate([])
    return (dict(zip(images["url_hash"].to_pylist(), images["url"].to_pylist(), strict=True)),
            dict(zip(texts["caption_hash"].to_pylist(), texts["caption"].to_pylist(),
                     strict=True)))
