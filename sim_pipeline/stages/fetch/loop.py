"""Fetching many URLs concurrently in one process: one event loop, store calls on threads.

Downloads run on the event loop; store calls block (boto3, disk), so they run on a thread pool,
the cache check in batches and the saves through a ``Saver`` that bounds how many are pending.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from sim_pipeline.core import repairs
from sim_pipeline.core.config import Settings
from sim_pipeline.core.layout import image_key, image_meta_key
from sim_pipeline.core.store import ObjectStore
from sim_pipeline.core.streams import batched
from sim_pipeline.stages.fetch.download import Downloader, Outcome
from sim_pipeline.stages.fetch.guard import Resolver
from sim_pipeline.stages.fetch.records import FetchStats, needs_fetch, save_fetch


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


def refetch(urls: dict[str, str], store: ObjectStore, settings: Settings) -> FetchStats:
    """Fetch ``{url_hash: url}`` again after their bytes or records were found damaged or
    missing: both are removed first, so nothing of the damaged copy survives."""
    for url_hash in urls:
        store.delete(image_key(url_hash))
        store.delete(image_meta_key(url_hash))
    return asyncio.run(fetch_urls(urls, store, settings))


async def _uncached(urls: dict[str, str], store: ObjectStore, refetch_errors: bool,
                    io: ThreadPoolExecutor, batch: int = 128) -> dict[str, str]:
    """The URLs that need fetching; checked in batches on threads (S3: one HEAD each)."""
    loop = asyncio.get_running_loop()
    items = sorted(urls.items())

    def check(part: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(h, u) for h, u in part if needs_fetch(store, h, refetch_errors)]

    parts = await asyncio.gather(*(loop.run_in_executor(io, repairs.carried(check), part)
                                   for part in batched(items, batch)))
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
