"""Stage 3, embed-images: one unit vector per distinct fetched image of a chunk.

Vectors already in the embedding cache cost no inference; the model is loaded only when some
vector is missing. Images are decoded and preprocessed by worker threads a few batches ahead of the
model, so decoding overlaps inference; only one full-size image per batch is alive at a time.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from sim_pipeline.core import errors as errors_code
from sim_pipeline.core import repairs
from sim_pipeline.core.config import Settings
from sim_pipeline.core.layout import ChunkRef, image_key, image_meta_key, model_tag
from sim_pipeline.core.store import IntegrityError, ObjectStore, read_json, sha256_bytes
from sim_pipeline.core.streams import batched
from sim_pipeline.stages.decode import DecodeFailed, decode_image
from sim_pipeline.stages.embed.encoders import encoder_for, remote_encoder, vector_tag
from sim_pipeline.stages.embed.remote import remote_image_vectors
from sim_pipeline.stages.embed.sets import (
    EmbedStats,
    assemble,
    save_embedding_set,
    set_is_whole,
)
from sim_pipeline.stages.embed.vector_cache import VectorCache
from sim_pipeline.stages.fetch.loop import refetch
from sim_pipeline.stages.known import Fetched, previous_vectors, read_fetched, write_vectors
from sim_pipeline.stages.plan import read_chunk_table, scorable_keys

if TYPE_CHECKING:
    from PIL import Image

T = TypeVar("T")
R = TypeVar("R")
DECODE_WORKERS = max(1, min(4, os.cpu_count() or 1))


def prefetched(work: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map(work, items)`` on a thread pool, in order, at most ``workers + 1`` results ahead."""
    work = repairs.carried(work)
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Any] = deque()
        for item in items:
            pending.append(pool.submit(work, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _fetched_images(store: ObjectStore, url_hashes: list[str],
                    indexed: dict[str, Fetched]) -> tuple[
        dict[str, str], dict[str, str], dict[str, int], list[str]]:
    """From the chunk's fetch index, else the fetch records: ``({url_hash: image sha256},
    {url_hash: fetch error}, {url_hash: pixels}, [url_hash whose record is missing or
    damaged])``."""
    content, errors, sizes, lost = {}, {}, {}, []
    for url_hash in url_hashes:
        if url_hash in indexed:
            sha, error, pixels = indexed[url_hash]
            if error is not None:
                errors[url_hash] = error
            else:
                content[url_hash], sizes[url_hash] = str(sha), pixels
            continue
        try:
            record = read_json(store, image_meta_key(url_hash))
        except KeyError:
            lost.append(url_hash)
            continue
        except IntegrityError as damaged:
            repairs.note("image record", store.uri(image_meta_key(url_hash)), damaged)
            lost.append(url_hash)
            continue
        if record.get("error"):
            errors[url_hash] = record["error"]
        else:
            content[url_hash] = record["sha256"]
            sizes[url_hash] = (record.get("width") or 1) * (record.get("height") or 1)
    return content, errors, sizes, lost


class PixelBudget:
    """Decoded pixels in flight across the decode threads, at most ``limit``.

    Counting images is not enough: a photo near the pixel cap is ~150 MB once decoded, so a few
    threads each holding one would multiply the stage's peak memory. A thread waits until its
    image fits; an image as large as the whole budget decodes alone.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(max(pixels, 1), self.limit)
        with self._changed:
            self._changed.wait_for(lambda: self.used + pixels <= self.limit)
            self.used += pixels
        try:
            yield
        finally:
            with self._changed:
                self.used -= pixels
                self._changed.notify_all()


def embed_images_chunk(chunk: ChunkRef, store: ObjectStore, settings: Settings) -> EmbedStats:
    """Decode and embed every fetched image of the chunk not already embedded.

    An image whose record or bytes are missing or damaged is fetched again first (noted in
    ``repairs``); a damaged embedding set of an earlier attempt is recomputed.
    """
    key = chunk.image_embeddings_key(model_tag(settings.model, settings.variant))
    if set_is_whole(store, key, "image embeddings"):
        return EmbedStats(chunk_done_before=True)
    urls, _ = scorable_keys(read_chunk_table(store, chunk))
    url_hashes = sorted(urls)
    refetched: set[str] = set()
    earlier = previous_vectors(store, chunk, "images", vector_tag(settings))
    # Index facts stand in for records only where no bytes will be read: a failed fetch, or an
    # image whose vector is known too. Others read their record, so a lost one is fetched again.
    indexed = {h: facts for h, facts in read_fetched(store, chunk).items()
               if facts.error is not None or facts.sha256 in earlier}
    while True:  # each image is fetched again at most once, so this ends
        indexed = {h: facts for h, facts in indexed.items() if h not in refetched}
        content, errors, sizes, lost = _fetched_images(store, url_hashes, indexed)
        if set(lost) - refetched:
            refetched |= _refetch_once(lost, refetched, urls, store, settings)
            continue
        any_url = {sha: url_hash for url_hash, sha in sorted(content.items())}
        vectors, todo, failed, damaged = _image_vectors(any_url, store, settings, sizes,
                                                        earlier)
        if set(damaged) - refetched:  # vectors computed so far are cached for the next pass
            refetched |= _refetch_once(damaged, refetched, urls, store, settings)
            continue
        errors.update({h: errors_code.IMAGE_LOST for h in [*lost, *damaged]})
        errors.update({u: failed[sha] for u, sha in content.items() if sha in failed})
        break
    save_embedding_set(store, key, assemble(url_hashes, vectors, errors, content.get),
                       settings.model)
    if not settings.inference_url:
        write_vectors(store, chunk, "images", vector_tag(settings), vectors, earlier,
                      settings.model)
    return EmbedStats(len(todo) - len(failed), len(any_url) - len(todo), len(errors))


def _image_vectors(any_url: dict[str, str], store: ObjectStore, settings: Settings,
                   sizes: dict[str, int], earlier: dict[str, np.ndarray]
                   ) -> tuple[dict[str, np.ndarray], list[tuple[str, str]], dict[str, str],
                              list[str]]:
    """Vectors for ``{sha: url_hash}``, from the previous chunk's index, the cache or computed
    (locally or by the service): ``(vectors, images computed, decode failures by sha, url
    hashes whose bytes were lost)``."""
    if settings.inference_url:  # the service reads the bytes from the shared store
        with remote_encoder(settings) as client:
            vectors, failed = remote_image_vectors(client, any_url)
        return vectors, list(any_url.items()), failed, []
    cache = VectorCache(store, vector_tag(settings), "images")
    vectors = {sha: earlier[sha] for sha in any_url if sha in earlier}
    vectors |= cache.get_many(sha for sha in any_url if sha not in vectors)
    todo = [(sha, url_hash) for sha, url_hash in any_url.items() if sha not in vectors]
    if not todo:
        return vectors, todo, {}, []
    failed, damaged = _compute_image_vectors(todo, store, settings, cache, vectors, sizes)
    return vectors, todo, failed, damaged


def _refetch_once(url_hashes: list[str], refetched: set[str], urls: dict[str, str],
                  store: ObjectStore, settings: Settings) -> set[str]:
    """Fetch again the images not fetched again before; returns the url hashes it fetched."""
    again = {h: urls[h] for h in url_hashes if h not in refetched}
    refetch(again, store, settings)
    return set(again)


def _compute_image_vectors(todo: list[tuple[str, str]], store: ObjectStore, settings: Settings,
                           cache: VectorCache, vectors: dict[str, np.ndarray],
                           sizes: dict[str, int]) -> tuple[dict[str, str], list[str]]:
    """Embed ``(sha, url_hash)`` images; returns decode failures by sha, and the url hashes
    whose bytes were missing or did not match their record (to fetch again)."""
    encoder = encoder_for(settings, "image")
    budget = PixelBudget(settings.max_pixels)
    failed: dict[str, str] = {}
    damaged: list[str] = []

    def prepare(batch: list[tuple[str, str]]) -> tuple[list[str], Any]:
        done: list[str] = []

        def decoded() -> Iterator[Image.Image]:  # one full-size image alive at a time
            for sha, url_hash in batch:
                with budget.hold(sizes.get(url_hash, 1)):
                    data = _verified_bytes(store, url_hash, sha)
                    if data is None:
                        damaged.append(url_hash)
                        continue
                    try:
                        image = decode_image(data, settings.max_pixels)
                    except DecodeFailed as failure:
                        failed[sha] = failure.code
                        continue
                    finally:
                        del data
                    done.append(sha)
                    yield image
                    del image

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
    return failed, damaged


def _verified_bytes(store: ObjectStore, url_hash: str, sha: str) -> bytes | None:
    """The image's bytes if they are there and are the ones its record describes."""
    key = image_key(url_hash)
    try:
        data = store.read_bytes(key)
    except (KeyError, IntegrityError) as lost:
        repairs.note("image", store.uri(key), "missing" if isinstance(lost, KeyError) else lost)
        return None
    if sha256_bytes(data) != sha:
        repairs.note("image", store.uri(key), "bytes differ from their record")
        return None
    return data
