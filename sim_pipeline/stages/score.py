"""Stage 5, join-score: join each row with its two embeddings and score it.

``cosine`` is the dot product of the two unit vectors; ``similarity = round((cosine + 1) / 2, 4)``
maps it into 0..1. A row carries the first error met on its way: input, fetch, decode.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

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
from sim_pipeline.stages.plan import InputRow, read_chunk_rows


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


def scored_pair(row: InputRow, image: np.ndarray, text: np.ndarray) -> ScoredRow:
    """The row's result from its two unit vectors: cosine in float64, clamped to [-1, 1]."""
    cosine = float(np.dot(image.astype(np.float64), text.astype(np.float64)))
    cosine = max(-1.0, min(1.0, cosine))
    return ScoredRow(row.row, row.url, row.url_hash, row.caption,
                     similarity_from_cosine(cosine), round(cosine, 6), None)


def failed_row(row: InputRow, error: str | None) -> ScoredRow:
    """The row's result when it has no score: no similarity, no cosine, just ``error``."""
    return ScoredRow(row.row, row.url, row.url_hash, row.caption, None, None, error)


def score_rows(rows: list[InputRow], images: EmbeddingSet, texts: EmbeddingSet) -> Iterator[
        ScoredRow]:
    image_index, text_index = images.lookup(), texts.lookup()
    for row in rows:
        error = row.error or images.errors.get(row.url_hash or "")
        if error:
            yield failed_row(row, error)
            continue
        yield scored_pair(row, images.vectors[image_index[row.url_hash]],
                          texts.vectors[text_index[caption_hash(row.caption)]])


def join_score_chunk(chunk: ChunkRef, store: ObjectStore, settings: Settings,
                     results: ResultsDB | None = None) -> list[ScoredRow]:
    """Score the chunk (reusing stored results) and upsert it into the results table."""
    tag = model_tag(settings.model, settings.variant)
    rows = read_chunk_rows(store, chunk)
    scored = _earlier_results(store, chunk, settings)
    if scored is None:
        images = load_embedding_set(store, chunk.image_embeddings_key(tag))
        texts = load_embedding_set(store, chunk.text_embeddings_key(tag))
        scored = list(score_rows(rows, images, texts))
        data = "".join(s.to_json() + "\n" for s in scored).encode("utf-8")
        store.write_bytes(chunk.results_key(tag), data)
        write_json(store, chunk.results_meta_key(tag),
                   {"sha256": sha256_bytes(data), "rows": len(scored)})
    if results is not None:
        results.upsert_scores(table_row(s, chunk.run_id, settings.model, row.fields)
                              for s, row in zip(scored, rows, strict=True))
    return scored


def _earlier_results(store: ObjectStore, chunk: ChunkRef, settings: Settings
                     ) -> list[ScoredRow] | None:
    """The chunk's results from an earlier attempt if they are whole; damaged ones are noted
    and scored again."""
    if not store.exists(chunk.results_meta_key(model_tag(settings.model, settings.variant))):
        return None
    try:
        return read_results(store, chunk, settings)
    except (IntegrityError, MissingObject, ValueError) as damaged:
        tag = model_tag(settings.model, settings.variant)
        repairs.note("results", store.uri(chunk.results_key(tag)), damaged)
        return None


def read_results(store: ObjectStore, chunk: ChunkRef, settings: Settings) -> list[ScoredRow]:
    """The chunk's results, verified against the digest written with them."""
    tag = model_tag(settings.model, settings.variant)
    meta = read_json(store, chunk.results_meta_key(tag))
    data = store.read_bytes(chunk.results_key(tag))
    if sha256_bytes(data) != meta["sha256"]:
        raise IntegrityError(f"{store.uri(chunk.results_key(tag))} is damaged: "
                             f"{REPAIR_ADVICE}.")
    return [ScoredRow.from_json(line) for line in data.decode("utf-8").split("\n") if line]


def table_row(scored: ScoredRow, run_id: str, model: str,
              input_fields: list[str] | None = None) -> dict[str, object]:
    return {
        "run_id": run_id, "row_number": scored.row, "image_url": scored.url,
        "url_hash": scored.url_hash, "caption": scored.caption,
        "caption_hash": caption_hash(scored.caption), "model": model,
        "similarity": scored.similarity, "cosine": scored.cosine, "error": scored.error,
        "input_fields": input_fields,
    }
