"""Stage 1, plan: stream the input CSV into normalised chunks in the object store.

Each chunk holds its rows verbatim (so finalize can reproduce every input column) plus the fields
the later stages need: the row number, the URL and its hash, the caption, and any input error.
Only one chunk is ever held in memory.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim_pipeline.core import errors
from sim_pipeline.core.config import Settings
from sim_pipeline.core.errors import UserError
from sim_pipeline.core.layout import ChunkRef, current_plan_key, manifest_key, sha256_hex
from sim_pipeline.core.store import ObjectStore, read_json, write_json
from sim_pipeline.core.urls import url_problem

URL_COLUMNS = ("url", "image_url", "image", "img_url", "link")
CAPTION_COLUMNS = ("caption", "text", "caption_text", "title")
csv.field_size_limit(16 * 1024 * 1024)


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
        return json.dumps(self.__dict__, ensure_ascii=False, separators=(",", ":"))

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


def normalise_row(row: int, url: str, caption: str, fields: list[str]) -> InputRow:
    url = url.strip()
    caption = caption.strip()
    error = url_problem(url) or (None if caption else errors.MISSING_CAPTION)
    url_hash = sha256_hex(url) if url else None
    return InputRow(row, url, url_hash, caption, error, fields)


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
    if not path.exists():
        raise UserError(f"Input file {path} does not exist.")
    if not path.is_file():
        raise UserError(f"Input {path} is not a file.")
    with path.open("rb") as handle:
        head = handle.read(65536)
    if b"\0" in head:
        raise UserError(f"Input file {path} is not a CSV file (it contains binary data).")


def read_rows(path: Path, settings: Settings) -> tuple[list[str], int, int, Iterator[list[str]]]:
    """Open the CSV streaming; return its header, URL and caption indexes, and the row iterator."""
    check_input_file(path)
    handle = path.open(newline="", encoding="utf-8-sig")
    reader = csv.reader(handle, delimiter=delimiter_for(path))
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(f"Input file {path} is empty: it needs a header row.") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"Input file {path} is not a readable UTF-8 CSV: {error}.") from None
    url_index = find_column(header, URL_COLUMNS, settings.url_column, "url")
    caption_index = find_column(header, CAPTION_COLUMNS, settings.caption_column, "caption")

    def rows() -> Iterator[list[str]]:
        with handle:
            try:
                yield from reader
            except (UnicodeDecodeError, csv.Error) as error:
                raise UserError(
                    f"Input file {path} is not a readable UTF-8 CSV near line "
                    f"{reader.line_num}: {error}."
                ) from None

    return header, url_index, caption_index, rows()


def normalise_csv_rows(header: list[str], url_index: int, caption_index: int,
                       rows: Iterable[list[str]]) -> Iterator[InputRow]:
    width = len(header)
    for number, fields in enumerate(rows):
        if len(fields) < width:
            fields = fields + [""] * (width - len(fields))
        row = normalise_row(number, fields[url_index], fields[caption_index], fields)
        if len(fields) > width:
            row = InputRow(row.row, row.url, row.url_hash, row.caption, errors.MALFORMED_ROW,
                           fields[:width])
        yield row


def write_chunks(store: ObjectStore, run_id: str, digest: str, rows: Iterable[InputRow],
                 chunk_size: int) -> list[ChunkRef]:
    """Write rows in chunks of ``chunk_size``, holding one chunk in memory at a time."""
    chunks: list[ChunkRef] = []
    buffer: list[str] = []
    first_row = 0

    def flush() -> None:
        ref = ChunkRef(run_id, digest, len(chunks), first_row, len(buffer))
        store.write_bytes(ref.rows_key, ("\n".join(buffer) + "\n").encode("utf-8"))
        chunks.append(ref)

    for row in rows:
        if not buffer:
            first_row = row.row
        buffer.append(row.to_json())
        if len(buffer) == chunk_size:
            flush()
            buffer = []
    if buffer:
        flush()
    return chunks


def plan_csv(path: str | Path, store: ObjectStore, settings: Settings, run_id: str) -> RunPlan:
    """Plan a run from a CSV file; the same input planned before is reused as it was."""
    path = Path(path)
    check_input_file(path)
    digest = input_digest(path, settings)
    if not store.exists(manifest_key(run_id, digest)):
        header, url_index, caption_index, rows = read_rows(path, settings)
        normalised = normalise_csv_rows(header, url_index, caption_index, rows)
        chunks = write_chunks(store, run_id, digest, normalised, settings.chunk_size)
        plan = RunPlan(run_id, digest, str(path), header, header[url_index],
                       header[caption_index], delimiter_for(path),
                       sum(c.rows for c in chunks), chunks)
        write_json(store, manifest_key(run_id, digest), plan.to_dict())
    write_json(store, current_plan_key(run_id), {"input_digest": digest})
    return load_plan(store, run_id, digest)


def plan_input(path: str | Path, store: ObjectStore, settings: Settings) -> RunPlan:
    """Plan ``path`` under the settings' run id, or under one derived from its content."""
    path = Path(path)
    check_input_file(path)
    return plan_csv(path, store, settings, settings.run_id or default_run_id(path, settings))


def load_plan(store: ObjectStore, run_id: str, digest: str | None = None) -> RunPlan:
    """The run's plan; its newest one unless a digest is given."""
    if digest is None:
        if not store.exists(current_plan_key(run_id)):
            raise UserError(f"Run {run_id} has not been planned in this store.")
        digest = read_json(store, current_plan_key(run_id))["input_digest"]
    return RunPlan.from_dict(read_json(store, manifest_key(run_id, digest)))


def read_chunk_rows(store: ObjectStore, chunk: ChunkRef) -> list[InputRow]:
    text = store.read_bytes(chunk.rows_key).decode("utf-8")
    return [InputRow.from_json(line) for line in text.splitlines() if line]
