"""The per-chunk cache index: what a chunk learned about its images and captions, for the next.

Each chunk's fetch and embed stages leave one index beside the chunk: the lasting fetch facts of
its URLs (``fetched.arrow``: url hash -> image sha256 or a lasting error, and pixel count), and
the vectors of its images and captions (``known-images.<tag>``, ``known-texts.<tag>``: content
hash -> vector). The next chunk of the run reads its predecessor's index, one object, and looks up
key by key only what that index lacks; so a chunk whose images and captions are all known reads
one index per stage, not one store object per key, and loads no model. An index carries its
predecessor's entries forward too (this chunk's first, ``INDEX_KEYS`` at most), so a key that
skips a chunk stays known.

An index is a cache of the per-key objects, which stay the source of truth: a missing or damaged
index (its chunk ran elsewhere, concurrently, or not yet) costs only the reads it would have
saved. Only lasting facts go in: a fetch that failed transiently is retried by the next chunk
that holds its URL, so it is never indexed.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from sim_pipeline.core import errors
from sim_pipeline.core.layout import ChunkRef, image_meta_key
from sim_pipeline.core.store import IntegrityError, ObjectStore, read_json
from sim_pipeline.stages.embed.sets import EmbeddingSet, load_embedding_set, save_embedding_set
from sim_pipeline.stages.plan import bytes_table, table_bytes

INDEX_KEYS = 16_384  # entries an index holds at most (ViT-B/32 vectors: 32 MB)
FETCHED_SCHEMA = pa.schema([("url_hash", pa.string()), ("sha256", pa.string()),
                            ("error", pa.string()), ("pixels", pa.int64())])
_UNREADABLE = (KeyError, IntegrityError, ValueError, pa.ArrowInvalid)


class Fetched(NamedTuple):
    """A URL's lasting fetch outcome: its image's sha256 and pixels, or its error code."""

    sha256: str | None
    error: str | None
    pixels: int


def _previous(chunk: ChunkRef) -> ChunkRef | None:
    if chunk.index == 0:
        return None
    return ChunkRef(chunk.run_id, chunk.input_digest, chunk.index - 1, 0, 0)


def fetched_key(chunk: ChunkRef) -> str:
    return f"{chunk.prefix}/fetched.arrow"


def vectors_key(chunk: ChunkRef, kind: str, tag: str) -> str:
    return f"{chunk.prefix}/known-{kind}.{tag}"


def lasting(record: dict[str, Any], refetch_errors: bool = False) -> Fetched | None:
    """A fetch record as an index entry; None when a later fetch may change it."""
    error = record.get("error")
    if error is not None and (refetch_errors or errors.retry_next_run(str(error))):
        return None
    if error is not None:
        return Fetched(None, str(error), 0)
    pixels = int(record.get("width") or 1) * int(record.get("height") or 1)
    return Fetched(str(record["sha256"]), None, pixels)


def read_fetched(store: ObjectStore, chunk: ChunkRef | None, refetch_errors: bool = False
                 ) -> dict[str, Fetched]:
    """The chunk's fetch index (``{}`` when there is none); errors left out if
    ``refetch_errors``."""
    if chunk is None:
        return {}
    try:
        table = bytes_table(store.read_bytes(fetched_key(chunk)))
    except _UNREADABLE:
        return {}
    if not table.schema.equals(FETCHED_SCHEMA):
        return {}
    columns = table.to_pydict()
    return {h: Fetched(s, e, p) for h, s, e, p in zip(
        columns["url_hash"], columns["sha256"], columns["error"], columns["pixels"], strict=True)
        if not (refetch_errors and e is not None)}


def previous_fetched(store: ObjectStore, chunk: ChunkRef, refetch_errors: bool = False
                     ) -> dict[str, Fetched]:
    return read_fetched(store, _previous(chunk), refetch_errors)


def records_of(store: ObjectStore, url_hashes: list[str]) -> dict[str, Fetched]:
    """Lasting facts of URLs from their records, one read each (missing ones left out)."""
    found = {}
    for url_hash in url_hashes:
        try:
            record = read_json(store, image_meta_key(url_hash))
        except (KeyError, IntegrityError):
            continue
        entry = lasting(record)
        if entry is not None:
            found[url_hash] = entry
    return found


def _carried(own: dict[str, Any], earlier: dict[str, Any]) -> dict[str, Any]:
    """This chunk's entries, then the earlier index's others, ``INDEX_KEYS`` at most."""
    merged = dict(own)
    for key, value in earlier.items():
        if len(merged) >= INDEX_KEYS:
            break
        merged.setdefault(key, value)
    return merged


def write_fetched(store: ObjectStore, chunk: ChunkRef, own: dict[str, Fetched],
                  earlier: dict[str, Fetched]) -> None:
    entries = _carried(own, earlier)
    keys = sorted(entries)
    table = pa.Table.from_arrays(
        [pa.array(keys, pa.string()), pa.array([entries[k].sha256 for k in keys], pa.string()),
         pa.array([entries[k].error for k in keys], pa.string()),
         pa.array([entries[k].pixels for k in keys], pa.int64())], schema=FETCHED_SCHEMA)
    store.write_bytes(fetched_key(chunk), table_bytes(table))


def previous_vectors(store: ObjectStore, chunk: ChunkRef, kind: str, tag: str
                     ) -> dict[str, np.ndarray]:
    """The vectors the previous chunk's index holds, by content hash (``{}`` when none)."""
    before = _previous(chunk)
    if before is None:
        return {}
    try:
        known = load_embedding_set(store, vectors_key(before, kind, tag))
    except _UNREADABLE:
        return {}
    return dict(zip(known.keys, known.vectors, strict=True))


def write_vectors(store: ObjectStore, chunk: ChunkRef, kind: str, tag: str,
                  own: dict[str, np.ndarray], earlier: dict[str, np.ndarray], model: str) -> None:
    entries = _carried(own, earlier)
    if not entries:
        return
    keys = sorted(entries)
    save_embedding_set(store, vectors_key(chunk, kind, tag),
                       EmbeddingSet(keys, np.stack([entries[k] for k in keys]), {}), model)
