"""Stages 3 and 4, embed-images and embed-texts: one unit vector per distinct image or caption.

Each stage writes an *embedding set* per chunk and model: ``<key>.npy`` (float32 vectors, one row
per key) and ``<key>.json`` (the keys, per-key error codes, the model). The JSON is written last
and marks the set complete, so a crash mid-stage leaves nothing a rerun would trust.

Vectors already in the embedding cache cost no inference; the model is loaded only when some
vector is missing. Images are decoded and preprocessed by worker threads a few batches ahead of the
model, so decoding overlaps inference.
"""

from __future__ import annotations

import io
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from sim_pipeline.config import Settings
from sim_pipeline.embedding_cache import VectorCache
from sim_pipeline.layout import ChunkRef, image_key, image_meta_key, model_tag, sha256_hex
from sim_pipeline.plan import InputRow, read_chunk_rows
from sim_pipeline.preprocess import DecodeFailed, decode_image
from sim_pipeline.store import ObjectStore, read_json, write_json

if TYPE_CHECKING:
    from PIL import Image

T = TypeVar("T")
R = TypeVar("R")
DECODE_WORKERS = max(1, min(4, os.cpu_count() or 1))


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
    computed: int = 0
    from_cache: int = 0
    failed: int = 0
    chunk_done_before: bool = False


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def prefetched(work: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map(work, items)`` on a thread pool, in order, at most ``workers + 1`` results ahead."""
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Any] = deque()
        for item in items:
            pending.append(pool.submit(work, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


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


def assemble(keys: list[str], vectors: dict[str, np.ndarray], errors: dict[str, str],
             content: Callable[[str], str] = lambda key: key) -> EmbeddingSet:
    """Stack the vectors of ``keys`` (looked up by their content hash) into one set."""
    dim = len(next(iter(vectors.values()))) if vectors else 0
    matrix = np.zeros((len(keys), dim), dtype=np.float32)
    for i, key in enumerate(keys):
        if key not in errors:
            matrix[i] = vectors[content(key)]
    return EmbeddingSet(keys, matrix, errors)


def _scorable(rows: list[InputRow]) -> list[InputRow]:
    return [r for r in rows if r.error is None]


def _fetched_images(store: ObjectStore, chunk: ChunkRef, url_hashes: list[str]) -> tuple[
        dict[str, str], dict[str, str]]:
    """``({url_hash: image sha256}, {url_hash: fetch error})`` from the fetch records."""
    content, errors = {}, {}
    for url_hash in url_hashes:
        if not store.exists(image_meta_key(url_hash)):
            raise RuntimeError(f"chunk {chunk.index} of run {chunk.run_id} was not fetched yet")
        record = read_json(store, image_meta_key(url_hash))
        if record.get("error"):
            errors[url_hash] = record["error"]
        else:
            content[url_hash] = record["sha256"]
    return content, errors


def embed_images_chunk(chunk: ChunkRef, store: ObjectStore, settings: Settings) -> EmbedStats:
    """Decode and embed every fetched image of the chunk not already embedded."""
    key = chunk.image_embeddings_key(model_tag(settings.model, settings.variant))
    if store.exists(f"{key}.json"):
        return EmbedStats(chunk_done_before=True)
    rows = _scorable(read_chunk_rows(store, chunk))
    url_hashes = sorted({r.url_hash for r in rows if r.url_hash})
    content, errors = _fetched_images(store, chunk, url_hashes)
    any_url = {sha: url_hash for url_hash, sha in sorted(content.items())}
    cache = VectorCache(store, _vector_tag(settings), "images")
    vectors = cache.get_many(any_url)
    todo = [(sha, url_hash) for sha, url_hash in any_url.items() if sha not in vectors]
    failed = _compute_image_vectors(todo, store, settings, cache, vectors) if todo else {}
    errors.update({u: failed[sha] for u, sha in content.items() if sha in failed})
    save_embedding_set(store, key, assemble(url_hashes, vectors, errors, content.get),
                       settings.model)
    return EmbedStats(len(todo) - len(failed), len(any_url) - len(todo), len(errors))


def _compute_image_vectors(todo: list[tuple[str, str]], store: ObjectStore, settings: Settings,
                           cache: VectorCache, vectors: dict[str, np.ndarray]) -> dict[str, str]:
    """Embed ``(sha, url_hash)`` images; returns decode failures by sha."""
    encoder = _encoder(settings, "image")
    failed: dict[str, str] = {}

    def prepare(batch: list[tuple[str, str]]) -> tuple[list[str], Any]:
        done: list[str] = []

        def decoded() -> Iterator[Image.Image]:  # one full-size image alive at a time
            for sha, url_hash in batch:
                try:
                    image = decode_image(store.read_bytes(image_key(url_hash)),
                                         settings.max_pixels)
                except DecodeFailed as failure:
                    failed[sha] = failure.code
                    continue
                done.append(sha)
                yield image

        pixels = encoder.preprocess(decoded())
        return done, pixels if done else None

    # Cache writes go to a background thread so the model never waits on the store.
    with ThreadPoolExecutor(1) as writer:
        writes = []
        for done, pixels in prefetched(prepare, batched(todo, settings.batch_size),
                                       DECODE_WORKERS):
            if done:
                new = dict(zip(done, encoder.encode_pixels(pixels), strict=True))
                writes.append(writer.submit(cache.put_many, new))
                vectors.update(new)
        for write in writes:
            write.result()  # a failed write fails the stage
    return failed


def embed_texts_chunk(chunk: ChunkRef, store: ObjectStore, settings: Settings) -> EmbedStats:
    """Embed every distinct caption of the chunk not already embedded."""
    key = chunk.text_embeddings_key(model_tag(settings.model, settings.variant))
    if store.exists(f"{key}.json"):
        return EmbedStats(chunk_done_before=True)
    rows = _scorable(read_chunk_rows(store, chunk))
    captions = {caption_hash(r.caption): r.caption for r in rows}
    cache = VectorCache(store, _vector_tag(settings), "texts") if captions else None
    vectors = cache.get_many(captions) if cache else {}
    # Similar lengths share a batch, so padding to the longest wastes little.
    todo = sorted((h for h in captions if h not in vectors), key=lambda h: (len(captions[h]), h))
    for batch in batched(todo, settings.batch_size):
        encoded = _encoder(settings, "text").encode_texts([captions[h] for h in batch])
        new = dict(zip(batch, encoded, strict=True))
        cache.put_many(new)  # type: ignore[union-attr]
        vectors.update(new)
    save_embedding_set(store, key, assemble(sorted(captions), vectors, {}), settings.model)
    return EmbedStats(len(todo), len(captions) - len(todo), 0)


def _vector_tag(settings: Settings) -> str:
    """Cache vectors under the precision really used, so CPU and GPU vectors never mix."""
    if settings.backend != "torch":
        return model_tag(settings.model, settings.backend)
    from sim_pipeline.model import resolved_precision

    return model_tag(settings.model, resolved_precision(settings.device, settings.precision))


def _encoder(settings: Settings, tower: str):  # noqa: ANN202 - imported lazily
    """The torch tower, or its ONNX Runtime export when ``SIM_PIPELINE_BACKEND`` asks for it."""
    if settings.backend != "torch":
        from sim_pipeline.onnx_backend import load_onnx_encoder

        return load_onnx_encoder(settings.model, settings.backend, tower, settings.store)
    from sim_pipeline.model import load_encoder

    return load_encoder(settings.model, settings.device, settings.precision, tower)
