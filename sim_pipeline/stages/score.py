"""Stage 5, join-score: join each row with its two embeddings and score it.

``cosine`` is the dot product of the two unit vectors; ``similarity = round((cosine + 1) / 2, 4)``
maps it into 0..1. A row carries the first error met on its way: input, fetch, decode.

The chunk is scored as arrays: each row's vectors are gathered by index from the two embedding
sets and dotted in one numpy call; results are an Arrow file beside the chunk (``RESULT_SCHEMA``)
and go to the results table as columns (``ResultsDB.upsert_score_columns``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sim_pipeline.core import repairs
from sim_pipeline.core.config import Settings
from sim_pipeline.core.layout import ChunkRef, caption_hash, model_tag
from sim_pipeline.core.store import (
    REPAIR_ADVICE,
    IntegrityError,
    MissingObject,
    ObjectStore,
    read_json,
    sha256_bytes,
    write_json,
)
from sim_pipeline.results.db import ResultsDB
from sim_pipeline.stages.embed.sets import EmbeddingSet, load_embedding_set
from sim_pipeline.stages.plan import InputRow, bytes_table, read_chunk_table, table_bytes

RESULT_SCHEMA = pa.schema([("similarity", pa.float64()), ("cosine", pa.float64()),
                           ("error", pa.string())])
_TIE = 1e-6  # how close to a rounding tie a value must be for numpy's rounding to be checked


@dataclass(frozen=True)
class ScoredRow:
    row: int
    url: str
    url_hash: str | None
    caption: str
    similarity: float | None
    cosine: float | None
    error: str | None

    def to_json(self) -> str:
        """ASCII only: no caption or URL can put a line break into a results line."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> ScoredRow:
        return cls(**json.loads(line))


def similarity_from_cosine(cosine: float) -> float:
    return round((cosine + 1.0) / 2.0, 4)


def rounded(values: np.ndarray, digits: int) -> np.ndarray:
    """``round(value, digits)`` of each value, exactly as Python rounds it.

    numpy rounds ``value * 10**digits``, whose product can land on the other side of a tie than
    the exact value; the few values near a tie are rounded by Python instead.
    """
    out = np.round(values, digits)
    scaled = values * 10.0**digits
    near_tie = np.abs(scaled - np.floor(scaled) - 0.5) < _TIE
    for i in np.flatnonzero(near_tie):
        out[i] = round(float(values[i]), digits)
    return out


def scored_pair(row: InputRow, image: np.ndarray, text: np.ndarray) -> ScoredRow:
    """The row's result from its two unit vectors: cosine in float64, clamped to [-1, 1]."""
    cosine = float(np.dot(image.astype(np.float64), text.astype(np.float64)))
    cosine = max(-1.0, min(1.0, cosine))
    return ScoredRow(row.row, row.url, row.url_hash, row.caption,
                     similarity_from_cosine(cosine), round(cosine, 6), None)


def failed_row(row: InputRow, error: str | None) -> ScoredRow:
    """The row's result when it has no score: no similarity, no cosine, just ``error``."""
    return ScoredRow(row.row, row.url, row.url_hash, row.caption, None, None, error)


@dataclass(frozen=True)
class ScoredChunk(Sequence[ScoredRow]):
    """A chunk's rows (``plan.CHUNK_SCHEMA``) and their results (``RESULT_SCHEMA``) as columns;
    a sequence of ``ScoredRow`` for callers that want one object per row."""

    rows: pa.Table
    results: pa.Table

    def __len__(self) -> int:
        return self.rows.num_rows

    @overload
    def __getitem__(self, index: int) -> ScoredRow: ...
    @overload
    def __getitem__(self, index: slice) -> list[ScoredRow]: ...

    def __getitem__(self, index: int | slice) -> ScoredRow | list[ScoredRow]:
        return list(self)[index]

    def __iter__(self) -> Iterator[ScoredRow]:
        rows, results = self.rows.to_pydict(), self.results.to_pydict()
        return map(ScoredRow, rows["row"], rows["url"], rows["url_hash"], rows["caption"],
                   results["similarity"], results["cosine"], results["error"])

    def error_counts(self) -> Counter[str | None]:
        """Rows by error code; ``None``: scored."""
        counts = pc.value_counts(self.results["error"]).to_pylist()
        return Counter({c["values"]: c["counts"] for c in counts})

    @property
    def ok(self) -> int:
        return self.results["error"].null_count


def _positions(keys: pa.ChunkedArray, of: list[str]) -> pa.Array:
    """Each key's index in ``of`` (null when absent)."""
    return pc.index_in(keys, value_set=pa.array(of, pa.string())).combine_chunks()


def score_columns(rows: pa.Table, images: EmbeddingSet, texts: EmbeddingSet) -> pa.Table:
    """The chunk's results (``RESULT_SCHEMA``): gathered vectors, one dot product per row."""
    image_at, text_at = _positions(rows["url_hash"], images.keys), \
        _positions(rows["caption_hash"], texts.keys)
    image_errors = pa.array([images.errors.get(key) for key in images.keys], pa.string())
    error = pc.coalesce(rows["error"].combine_chunks(), image_errors.take(image_at))
    ok = error.is_null().to_numpy(zero_copy_only=False)
    if (image_at.filter(ok).null_count or text_at.filter(ok).null_count):
        raise IntegrityError("The chunk's embeddings do not cover all its rows: "
                             f"{REPAIR_ADVICE}.")
    cosine = np.zeros(0)
    if ok.any():
        image_index = image_at.filter(ok).to_numpy()
        text_index = text_at.filter(ok).to_numpy()
        cosine = np.einsum("ij,ij->i", images.vectors[image_index].astype(np.float64),
                           texts.vectors[text_index].astype(np.float64))
        cosine = np.clip(cosine, -1.0, 1.0)
    mask = ~ok
    similarity = np.full(len(ok), np.nan)
    cosines = np.full(len(ok), np.nan)
    similarity[ok] = rounded((cosine + 1.0) / 2.0, 4)
    cosines[ok] = rounded(cosine, 6)
    return pa.Table.from_arrays([pa.array(similarity, mask=mask), pa.array(cosines, mask=mask),
                                 error], schema=RESULT_SCHEMA)


def score_rows(rows: list[InputRow], images: EmbeddingSet, texts: EmbeddingSet) -> Iterator[
        ScoredRow]:
    """One row at a time (the service's small batches); ``score_columns`` for a chunk."""
    image_index, text_index = images.lookup(), texts.lookup()
    for row in rows:
        error = row.error or images.errors.get(row.url_hash or "")
        if error:
            yield failed_row(row, error)
            continue
        yield scored_pair(row, images.vectors[image_index[row.url_hash]],
                          texts.vectors[text_index[caption_hash(row.caption)]])


def join_score_chunk(chunk: ChunkRef, store: ObjectStore, settings: Settings,
                     results: ResultsDB | None = None) -> ScoredChunk:
    """Score the chunk (reusing stored results) and upsert it into the results table."""
    tag = model_tag(settings.model, settings.variant)
    rows = read_chunk_table(store, chunk)
    scored = _earlier_results(store, chunk, settings)
    if scored is None:
        images = load_embedding_set(store, chunk.image_embeddings_key(tag))
        texts = load_embedding_set(store, chunk.text_embeddings_key(tag))
        scored = score_columns(rows, images, texts)
        data = table_bytes(scored)
        store.write_bytes(chunk.results_key(tag), data)
        write_json(store, chunk.results_meta_key(tag),
                   {"sha256": sha256_bytes(data), "rows": scored.num_rows})
    if results is not None:
        results.upsert_score_columns(chunk.run_id, settings.model, rows, scored)
    return ScoredChunk(rows, scored)


def _earlier_results(store: ObjectStore, chunk: ChunkRef, settings: Settings
                     ) -> pa.Table | None:
    """The chunk's results from an earlier attempt if they are whole; damaged ones are noted
    and scored again."""
    if not store.exists(chunk.results_meta_key(model_tag(settings.model, settings.variant))):
        return None
    try:
        return read_result_table(store, chunk, settings)
    except (IntegrityError, MissingObject, ValueError, pa.ArrowInvalid) as damaged:
        tag = model_tag(settings.model, settings.variant)
        repairs.note("results", store.uri(chunk.results_key(tag)), damaged)
        return None


def read_result_table(store: ObjectStore, chunk: ChunkRef, settings: Settings) -> pa.Table:
    """The chunk's results (``RESULT_SCHEMA``), verified against the digest written with them."""
    tag = model_tag(settings.model, settings.variant)
    meta = read_json(store, chunk.results_meta_key(tag))
    data = store.read_bytes(chunk.results_key(tag))
    if sha256_bytes(data) != meta["sha256"]:
        raise IntegrityError(f"{store.uri(chunk.results_key(tag))} is damaged: "
                             f"{REPAIR_ADVICE}.")
    table = bytes_table(data)
    if not table.schema.equals(RESULT_SCHEMA) or table.num_rows != chunk.rows:
        raise IntegrityError(f"{store.uri(chunk.results_key(tag))} does not match its chunk: "
                             f"{REPAIR_ADVICE}.")
    return table


def read_results(store: ObjectStore, chunk: ChunkRef, settings: Settings) -> list[ScoredRow]:
    """The chunk's results, one object per row."""
    return list(ScoredChunk(read_chunk_table(store, chunk),
                            read_result_table(store, chunk, settings)))


def table_row(scored: ScoredRow, run_id: str, model: str,
              input_fields: list[str] | None = None) -> dict[str, object]:
    return {
        "run_id": run_id, "row_number": scored.row, "image_url": scored.url,
        "url_hash": scored.url_hash, "caption": scored.caption,
        "caption_hash": caption_hash(scored.caption), "model": model,
        "similarity": scored.similarity, "cosine": scored.cosine, "error": scored.error,
        "input_fields": input_fields,
    }
