"""Stage 2, fetch-images: download each distinct URL of a chunk once and cache it in the store.

Bytes go to ``images/<h[:2]>/<h>`` and a small JSON record beside them (status, content type,
size, sha256, format, pixel size, error code). The record is written last, so its presence means
"done". A URL with a record is never fetched again, with two exceptions: a transient failure
(timeout, connection error, 408, 429, 5xx) is retried by the next run, and any other failure when
``--refetch-errors`` is given. How one URL is downloaded (safety, limits, retries) is ``download``.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sim_pipeline import errors, fetch_workers
from sim_pipeline.config import Settings
from sim_pipeline.download import Downloader, Outcome
from sim_pipeline.layout import ChunkRef, image_key, image_meta_key
from sim_pipeline.netguard import Resolver
from sim_pipeline.plan import read_chunk_rows
from sim_pipeline.preprocess import DecodeFailed, inspect_image
from sim_pipeline.store import ObjectStore, read_json, sha256_bytes, write_json

MIN_URLS_PER_PROCESS = 1000
_BUCKET_RATIO = 1.1  # latency histogram: each bucket 10% wider than the last


@dataclass(frozen=True)
class FetchRecord:
    """What we learned about one URL; stored as JSON next to the bytes."""

    url: str
    error: str | None = None
    status: int | None = None
    content_type: str | None = None
    size: int = 0
    sha256: str | None = None
    format: str | None = None
    width: int | None = None
    height: int | None = None


@dataclass
class FetchStats:
    """Counts for one chunk or a whole run; ``latency`` is a mergeable log-bucket histogram."""

    attempted: int = 0
    ok: int = 0
    cached: int = 0
    bytes: int = 0
    retries: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latency: Counter[int] = field(default_factory=Counter)

    def count(self, record: FetchRecord, outcome: Outcome) -> None:
        self.attempted += 1
        self.bytes += record.size
        self.retries += outcome.retries
        self.latency[math.ceil(math.log(max(outcome.seconds, 1e-4) * 1000, _BUCKET_RATIO))] += 1
        if record.error:
            self.errors[record.error] += 1
        else:
            self.ok += 1

    def add(self, other: FetchStats) -> None:
        self.attempted += other.attempted
        self.ok += other.ok
        self.cached += other.cached
        self.bytes += other.bytes
        self.retries += other.retries
        self.errors.update(other.errors)
        self.latency.update(other.latency)

    def latency_seconds(self, quantile: float) -> float | None:
        """Per-URL latency (first request to final answer, retries included), within 5%."""
        total = sum(self.latency.values())
        seen = 0
        for bucket in sorted(self.latency):
            seen += self.latency[bucket]
            if seen >= quantile * total:
                return round(_BUCKET_RATIO ** (bucket - 0.5) / 1000, 4)
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"attempted": self.attempted, "ok": self.ok, "cached": self.cached,
                "bytes": self.bytes, "retries": self.retries,
                "errors": dict(sorted(self.errors.items())),
                "latency_p50_s": self.latency_seconds(0.5),
                "latency_p95_s": self.latency_seconds(0.95),
                "latency_buckets": {str(k): v for k, v in sorted(self.latency.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FetchStats:
        return cls(data["attempted"], data["ok"], data["cached"], data["bytes"],
                   data.get("retries", 0), Counter(data["errors"]),
                   Counter({int(k): v for k, v in data.get("latency_buckets", {}).items()}))


def needs_fetch(store: ObjectStore, url_hash: str, refetch_errors: bool = False) -> bool:
    if not store.exists(image_meta_key(url_hash)):
        return True
    error = read_json(store, image_meta_key(url_hash)).get("error")
    return errors.is_transient(error) or (refetch_errors and error is not None)


def describe(url: str, outcome: Outcome, max_pixels: int) -> FetchRecord:
    """The record for a download; an image is checked from its header (format, pixel count)."""
    record = FetchRecord(url, outcome.error, outcome.status, outcome.content_type)
    if outcome.error:
        return record
    try:
        info = inspect_image(outcome.data, max_pixels)
    except DecodeFailed as failure:
        return replace(record, error=failure.code, size=len(outcome.data))
    return replace(record, size=len(outcome.data), sha256=sha256_bytes(outcome.data),
                   format=info.format, width=info.width, height=info.height)


def save_fetch(store: ObjectStore, url_hash: str, url: str, outcome: Outcome,
               max_pixels: int) -> FetchRecord:
    """Store the bytes (first writer wins) and then the record describing the stored bytes."""
    record = describe(url, outcome, max_pixels)
    if record.error is None and not store.create_bytes(image_key(url_hash), outcome.data,
                                                       record.sha256):
        stored = store.read_bytes(image_key(url_hash))
        record = describe(url, replace(outcome, data=stored), max_pixels)
    write_json(store, image_meta_key(url_hash), asdict(record))
    return record


async def fetch_urls(urls: dict[str, str], store: ObjectStore, settings: Settings,
                     resolver: Resolver | None = None) -> FetchStats:
    """Fetch ``{url_hash: url}`` concurrently, skipping cached ones, caching each result.

    Store calls block (boto3, disk), so they run on threads: the cache check in batches, the
    saves handed to a ``Saver`` without a round trip to the event loop per image.
    """
    stats = FetchStats()
    threads = min(getattr(store, "parallel_writes", 8), settings.fetch_concurrency)
    with ThreadPoolExecutor(threads, "store") as io:
        todo = await _uncached(urls, store, settings.refetch_errors, io)
        stats.cached = len(urls) - len(todo)
        saver = Saver(store, settings.max_pixels, stats, io)
        async with Downloader(settings, resolver) as downloader:

            async def one(url_hash: str, url: str) -> None:
                await saver.save(url_hash, url, await downloader.fetch(url))

            await asyncio.gather(*(one(h, u) for h, u in todo.items()))
        await saver.drain()
    return stats


async def _uncached(urls: dict[str, str], store: ObjectStore, refetch_errors: bool,
                    io: ThreadPoolExecutor, batch: int = 128) -> dict[str, str]:
    """The URLs that need fetching; checked in batches on threads (S3: one HEAD each)."""
    loop = asyncio.get_running_loop()
    items = sorted(urls.items())

    def check(part: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(h, u) for h, u in part if needs_fetch(store, h, refetch_errors)]

    parts = await asyncio.gather(*(loop.run_in_executor(io, check, items[i:i + batch])
                                   for i in range(0, len(items), batch)))
    return dict(pair for part in parts for pair in part)


class Saver:
    """Saves downloads on store threads and counts them. At most ``limit`` saves are pending at
    once, so a slow store slows the downloads down instead of filling memory with images."""

    def __init__(self, store: ObjectStore, max_pixels: int, stats: FetchStats,
                 io: ThreadPoolExecutor, limit: int = 256) -> None:
        self.store, self.max_pixels, self.stats, self.io = store, max_pixels, stats, io
        self.limit = limit
        self._loop = asyncio.get_running_loop()
        self._room = asyncio.Semaphore(limit)
        self._lock = threading.Lock()
        self._failures: list[Exception] = []

    async def save(self, url_hash: str, url: str, outcome: Outcome) -> None:
        await self._room.acquire()
        self.io.submit(self._save, url_hash, url, outcome)

    async def drain(self) -> None:
        """Wait for every save; a store error (bad credentials, full disk) is raised here."""
        for _ in range(self.limit):
            await self._room.acquire()
        if self._failures:
            raise self._failures[0]

    def _save(self, url_hash: str, url: str, outcome: Outcome) -> None:
        """On a store thread."""
        try:
            record = save_fetch(self.store, url_hash, url, outcome, self.max_pixels)
            with self._lock:
                self.stats.count(record, outcome)
        except Exception as error:  # handed to drain(), which raises it in the caller
            with self._lock:
                self._failures.append(error)
        finally:
            self._loop.call_soon_threadsafe(self._room.release)


def fetch_processes(settings: Settings, urls: int,
                    min_per_process: int = MIN_URLS_PER_PROCESS) -> int:
    """How many processes share a fetch: each needs enough URLs to repay its start (~0.5 s),
    and at least one global and one per-host slot of its own (the limits are split, so their
    sums still hold)."""
    wanted = settings.fetch_processes or os.cpu_count() or 1
    return max(1, min(wanted, urls // min_per_process, settings.fetch_concurrency,
                      settings.fetch_per_host))


def fetch_all(urls: dict[str, str], store: ObjectStore, settings: Settings,
              resolver: Resolver | None = None,
              min_per_process: int = MIN_URLS_PER_PROCESS) -> FetchStats:
    """``fetch_urls`` in this process, or split over worker processes (``fetch_workers``) so a
    large chunk keeps every core busy. The global and per-host limits are divided between them,
    so their sums still hold."""
    processes = fetch_processes(settings, len(urls), min_per_process)
    if processes == 1 or resolver is not None:
        return asyncio.run(fetch_urls(urls, store, settings, resolver))
    share = settings.replace(fetch_processes=1,
                             fetch_concurrency=settings.fetch_concurrency // processes,
                             fetch_per_host=settings.fetch_per_host // processes)
    items = sorted(urls.items())  # by URL hash: hosts spread evenly
    jobs = [(dict(items[i::processes]), store, share) for i in range(processes)]
    total = FetchStats()
    for part in fetch_workers.POOL.run(jobs):
        total.add(part)
    return total


def fetch_chunk(chunk: ChunkRef, store: ObjectStore, settings: Settings,
                resolver: Resolver | None = None) -> FetchStats:
    """Fetch every distinct, valid URL of a chunk that the store does not already hold.

    A chunk fetched before (its ``fetch.json`` exists) is not fetched again, so rerunning a run
    sends no requests; transient failures are retried by later runs, not by reruns.
    """
    distinct = {r.url_hash: r.url for r in read_chunk_rows(store, chunk)
                if r.error is None and r.url_hash}
    if store.exists(chunk.fetch_key):
        return FetchStats(cached=len(distinct))
    started = time.monotonic()
    stats = fetch_all(distinct, store, settings, resolver) if distinct else FetchStats()
    write_json(store, chunk.fetch_key,
               {**stats.to_dict(), "seconds": round(time.monotonic() - started, 3)})
    return stats


def load_fetch_stats(store: ObjectStore, chunks: list[ChunkRef]) -> FetchStats:
    """A run's fetch stats, summed from its chunks' ``fetch.json`` (chunks not fetched: none)."""
    total = FetchStats()
    for chunk in chunks:
        if store.exists(chunk.fetch_key):
            total.add(FetchStats.from_dict(read_json(store, chunk.fetch_key)))
    return total
