"""Stage 3, embed-images: one unit vector per distinct fetched image of a chunk.

Vectors already in the embedding cache cost no inference; the model is loaded only when some
vector is missing. Images are decoded and preprocessed by worker threads a few batches ahead of the
model, so decoding overlaps inference; only one full-size image per batch is alive at a time.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from sim_pipeline.core.config import Settings
from sim_pipeline.core.layout import ChunkRef, image_key, image_meta_key, model_tag
from sim_pipeline.core.store import ObjectStore, read_json
from sim_pipeline.core.streams import batched
from sim_pipeline.stages.decode import DecodeFailed, decode_image
from sim_pipeline.stages.embed.encoders import encoder_for, vector_tag
from sim_pipeline.stages.embed.sets import (
    EmbedStats,
    assemble,
    save_embedding_set,
    scorable,
)
from sim_pipeline.stages.embed.vector_cache import VectorCache
from sim_pipeline.stages.plan import read_chunk_rows

if TYPE_CHECKING:
    from PIL import Image

T = TypeVar("T")
R = TypeVar("R")
DECODE_WORKERS = max(1, min(4, os.cpu_count() or 1))


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
    rows = scorable(read_chunk_rows(store, chunk))
    url_hashes = sorted({r.url_hash for r in rows if r.url_hash})
    content, errors = _fetched_images(store, chunk, url_hashes)
    any_url = {sha: url_hash for url_hash, sha in sorted(content.items())}
    cache = VectorCache(store, vector_tag(settings), "images")
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
    encoder = encoder_for(settings, "image")
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
