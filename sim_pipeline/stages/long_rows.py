"""Rows past the row limit, kept as read: plan spills them, finalize writes them back.

A row longer than ``MAX_ROW_CHARS`` is scored ``field_too_long`` without its values ever being
held whole: the csv parser sees only its skeleton. So that the scored CSV still gives the row back
as it was read, plan streams the row's text, from its start, into the object store in parts of
``PART_CHARS`` (undecodable bytes as U+FFFD, as everywhere in the scored CSV), and finalize streams
those parts into the output, then the padding for missing columns and ``similarity`` / ``error``.
The results table keeps such a row's values blank.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from sim_pipeline.core.layout import long_row_key
from sim_pipeline.core.store import MissingObject, ObjectStore, read_json, write_json

PART_CHARS = 1 << 22  # characters per stored part: a long row is never in memory whole
_SURROGATE = re.compile("[\ud800-\udfff]")
# Where the csv parser stands inside a row, over a row's skeleton (see plan._skeleton).
FIELD_START, UNQUOTED, QUOTED, QUOTE_IN_QUOTED = range(4)


def after(state: int, skeleton: str, delimiter: str) -> int:
    """The csv parser's state after ``skeleton`` (QUOTE_MINIMAL, doubled quotes, not strict).
    Inside quotes it jumps to the next quote, so a quote never closed costs no per-character
    work; outside them a skeleton's ordinary runs are one character each."""
    at = 0
    while at < len(skeleton):
        if state == QUOTED:
            quote = skeleton.find('"', at)
            if quote < 0:
                return QUOTED
            state, at = QUOTE_IN_QUOTED, quote + 1
            continue
        char = skeleton[at]
        if char == delimiter or char in "\r\n":
            state = FIELD_START
        elif state in (FIELD_START, QUOTE_IN_QUOTED):
            state = QUOTED if char == '"' else UNQUOTED
        at += 1
    return state


@dataclass(frozen=True)
class Spill:
    """Where plan keeps its long rows: the run's store, under the plan's own keys."""

    store: ObjectStore
    run_id: str
    input_digest: str

    def key(self, row: int, part: str) -> str:
        return long_row_key(self.run_id, self.input_digest, row, part)


class LongRow:
    """One long row's text, written to the store a part at a time as it is read."""

    def __init__(self, spill: Spill, row: int, delimiter: str) -> None:
        self.spill, self.row, self.delimiter = spill, row, delimiter
        self.pending: list[str] = []
        self.pending_chars = 0
        self.parts = 0
        self.state = FIELD_START

    def write(self, text: str, skeleton: str) -> None:
        self.state = after(self.state, skeleton, self.delimiter)
        self.pending.append(text)
        self.pending_chars += len(text)
        if self.pending_chars >= PART_CHARS:
            held = "".join(self.pending)
            self._store_part(held[:-2])  # the last two may be the row's line end
            self.pending, self.pending_chars = [held[-2:]], 2

    def finish(self, fields: int) -> None:
        """The rest of the row, without its line end (unless a quote never closed holds it),
        and its description: parts, fields, and whether its last quote needs closing."""
        text = "".join(self.pending)
        open_quote = self.state == QUOTED
        if not open_quote:
            text = text.removesuffix("\n").removesuffix("\r")
        self._store_part(text)
        write_json(self.spill.store, self.spill.key(self.row, "meta.json"),
                   {"parts": self.parts, "fields": fields, "open_quote": open_quote})
        self.pending, self.pending_chars = [], 0

    def _store_part(self, text: str) -> None:
        text = _SURROGATE.sub("\ufffd", text)
        self.spill.store.write_bytes(self.spill.key(self.row, str(self.parts)),
                                     text.encode("utf-8"))
        self.parts += 1


def long_row_text(spill: Spill, row: int, width: int, delimiter: str) -> Iterator[str] | None:
    """The row as read, in parts, padded to ``width`` fields (ready for its two scored fields);
    None when the plan kept no copy of it (a plan written before long rows were kept)."""
    try:
        meta = read_json(spill.store, spill.key(row, "meta.json"))
    except MissingObject:
        return None

    def parts() -> Iterator[str]:
        for part in range(meta["parts"]):
            yield spill.store.read_bytes(spill.key(row, str(part))).decode("utf-8")
        if meta["open_quote"]:
            yield '"'
        yield delimiter * max(0, width - meta["fields"])

    return parts()
