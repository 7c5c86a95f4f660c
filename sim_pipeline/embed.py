"""Stages 3 and 4, embed-images and embed-texts: one unit vector per distinct image or caption.

Each stage writes an *embedding set* per chunk and model: ``<key>.npy`` (float32 vectors, one row
per key) and ``<key>.json`` (the keys, per-key error codes, the model). The JSON is written last
and marks the set complete, so a crash mid-stage leaves nothing a rerun would trust.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TypeVar

import numpy as np

from sim_pipeline.config import Settings
from sim_pipeline.layout import ChunkRef, image_key, image_meta_key, model_tag, sha256_hex
from sim_pipeline.plan import InputRow, read_chunk_rows
from sim_pipeline.preprocess import DecodeFailed, decode_image
from sim_pipeline.store import ObjectStore, read_json, write_json

T = TypeVar("T")


@dataclass(frozen=True)
class EmbeddingSet:
    """Vectors by key (url hash or caption hash); failed keys have an error instead."""

    keys: list[str]
    vectors: np.ndarray
    errors: dict[str, str]

    def lookup(self) -> dict[str, int]:
        return {key: i for i, key in enumerate(self.keys)}


@dataclass(frozen=True)
class EmbedStats:
    embedded: int
    failed: int
    cached: bool


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def save_embedding_set(store: ObjectStore, key: str, result: EmbeddingSet, model: str) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(result.vectors, dtype=np.float32), allow_pickle=False)
    store.write_bytes(f"{key}.npy", buffer.getvalue())
    write_json(store, f"{key}.json",
               {"keys": result.keys, "errors": result.errors, "model": model})


def load_embedding_set(store: ObjectStore, key: str) -> EmbeddingSet:
    meta = read_json(store, f"{key}.json")
    vectors = np.load(io.BytesIO(store.read_bytes(f"{key}.npy")), allow_pickle=False)
    return EmbeddingSet(meta["keys"], vectors, meta["errors"])


def caption_hash(caption: str) -> str:
    return sha256_hex(caption)


def _embed_set(keys: list[str], errors: dict[str, str], batch_size: int,
               encode_batch: Callable[[list[str]], tuple[list[str], np.ndarray]]) -> EmbeddingSet:
    """Run ``encode_batch`` over the keys that have no error yet; no model load if none."""
    encoded: dict[str, np.ndarray] = {}
    for batch in batched([k for k in keys if k not in errors], batch_size):
        done, vectors = encode_batch(batch)
        encoded.update(zip(done, vectors, strict=True))
    dim = len(next(iter(encoded.values()))) if encoded else 0
    vectors = np.zeros((len(keys), dim), dtype=np.float32)
    for i, key in enumerate(keys):
        if key in encoded:
            vectors[i] = encoded[key]
    return EmbeddingSet(keys, vectors, errors)


def _scorable(rows: list[InputRow]) -> list[InputRow]:
    return [r for r in rows if r.error is None]


def embed_images_chunk(chunk: ChunkRef, store: ObjectStore, settings: Settings) -> EmbedStats:
    """Decode and embed every fetched image of the chunk (skipped if already done)."""
    key = chunk.image_embeddings_key(model_tag(settings.model, settings.precision))
    if store.exists(f"{key}.json"):
        return EmbedStats(0, 0, cached=True)
    hashes = sorted({r.url_hash for r in _scorable(read_chunk_rows(store, chunk)) if r.url_hash})
    errors = {}
    for url_hash in hashes:
        if not store.exists(image_meta_key(url_hash)):
            raise RuntimeError(f"chunk {chunk.index} of run {chunk.run_id} was not fetched yet")
        if code := read_json(store, image_meta_key(url_hash)).get("error"):
            errors[url_hash] = code

    def encode(batch: list[str]) -> tuple[list[str], np.ndarray]:
        done, images = [], []
        for url_hash in batch:
            try:
                images.append(decode_image(store.read_bytes(image_key(url_hash))))
                done.append(url_hash)
            except DecodeFailed as failure:
                errors[url_hash] = failure.code
        if not images:
            return [], np.zeros((0, 0), dtype=np.float32)
        return done, _encoder(settings).encode_images(images)

    result = _embed_set(hashes, errors, settings.batch_size, encode)
    save_embedding_set(store, key, result, settings.model)
    return EmbedStats(len(hashes) - len(errors), len(errors), cached=False)


def embed_texts_chunk(chunk: ChunkRef, store: ObjectStore, settings: Settings) -> EmbedStats:
    """Tokenize (truncating at the model's limit) and embed every distinct caption of the chunk."""
    key = chunk.text_embeddings_key(model_tag(settings.model, settings.precision))
    if store.exists(f"{key}.json"):
        return EmbedStats(0, 0, cached=True)
    rows = _scorable(read_chunk_rows(store, chunk))
    captions = {caption_hash(r.caption): r.caption for r in rows}
    # Similar lengths share a batch, so padding to the longest wastes little.
    keys = sorted(captions, key=lambda h: (len(captions[h]), h))

    def encode(batch: list[str]) -> tuple[list[str], np.ndarray]:
        return batch, _encoder(settings).encode_texts([captions[h] for h in batch])

    result = _embed_set(keys, {}, settings.batch_size, encode)
    save_embedding_set(store, key, result, settings.model)
    return EmbedStats(len(keys), 0, cached=False)


def _encoder(settings: Settings):  # noqa: ANN202 - ClipEncoder, imported lazily
    from sim_pipeline.model import load_encoder

    return load_encoder(settings.model, settings.device, settings.precision)
