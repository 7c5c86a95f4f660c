"""Fetching many URLs concurrently in one process: one event loop, store calls on threads.

Downloads run on the event loop; store calls block (boto3, disk), so they run on a thread pool,
the cache check in batches and the saves through a ``Saver`` that bounds how many are pending.
Each download holds the URL's lease (``leases``), so runs sharing a store download a URL once.
"""

from __future__ import annotations

import asyncio
import random
import threading
from concurrent.futures import ThreadPoolExecutor

from sim_pipeline.core import repairs
from sim_pipeline.core.config import Settings
from sim_pipeline.core.layout import image_key, image_meta_key
from sim_pipeline.core.store import ObjectStore
from sim_pipeline.core.streams import batched
from sim_pipeline.stages.fetch.download import Downloader, Outcome
from sim_pipeline.stages.fetch.guard import Resolver
from sim_pipeline.stages.fetch.leases import LEASE_SECONDS, HeldLeases
from sim_pipeline.stages.fetch.records import (
    FetchStats,
    fetched_meanwhile,
    needs_fetch,
    save_fetch,
)

LEASE_POLL_SECONDS = (0.1, 2.0)  # first and longest wait before asking again for a held lease
DOWNLOAD, STORED, HELD = "download", "stored", "held"  # what claiming a URL's lease gives


async def fetch_urls(urls: dict[str, str], store: ObjectStore, settings: Settings,
                     resolver: Resolver | None = None) -> FetchStats:
    """Fetch ``{url_hash: url}`` concurrently, skipping cached ones, caching each result.

    Store calls block (boto3, disk), so they run on threads: the cache check in batches, the
    saves handed to a ``Saver`` without a round trip to the event loop per image. Leases have
    threads of their own, so claiming the next URL never waits behind the saves.
    """
    stats = FetchStats()
    threads = min(getattr(store, "parallel_writes", 8), settings.fetch_concurrency)
    with (ThreadPoolExecutor(threads, "store") as io,
          ThreadPoolExecutor(threads, "lease") as lease_io):
        todo = await _uncached(urls, store, settings.refetch_errors, io)
        stats.cached = len(urls) - len(todo)
        leases = HeldLeases(store)
        saver = Saver(store, settings.max_pixels, stats, io, leases)
        renewing = asyncio.create_task(_renew(leases, lease_io))
        try:
            async with Downloader(settings, resolver) as downloader:
                leased = Leased(store, settings, lease_io, downloader, saver)
                await asyncio.gather(*(leased.fetch(h, u) for h, u in todo.items()))
            await saver.drain()
        finally:
            renewing.cancel()
    return stats


async def _renew(leases: HeldLeases, io: ThreadPoolExecutor) -> None:
    """Keep the held leases alive while downloads take their time."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(LEASE_SECONDS / 3)
        await loop.run_in_executor(io, leases.renew)


class Leased:
    """Downloads under the URL's lease. A URL whose lease another run holds is left for later
    (this run's other URLs go first) and, once released, read from the store like a cached one;
    only ``fetch_concurrency`` leases are held at once, so each is held about one download."""

    def __init__(self, store: ObjectStore, settings: Settings, io: ThreadPoolExecutor,
                 downloader: Downloader, saver: Saver) -> None:
        self.store, self.settings, self.io = store, settings, io
        self.downloader, self.saver = downloader, saver
        self._room = asyncio.Semaphore(settings.fetch_concurrency)

    async def fetch(self, url_hash: str, url: str) -> None:
        loop = asyncio.get_running_loop()
        wait = LEASE_POLL_SECONDS[0]
        while True:
            async with self._room:
                claim = await loop.run_in_executor(self.io, self._claim, url_hash)
                if claim is not HELD:
                    if claim is DOWNLOAD:
                        await self.saver.save(url_hash, url, await self.downloader.fetch(url))
                    return
            await asyncio.sleep(wait * random.uniform(0.5, 1.0))
            wait = min(wait * 2, LEASE_POLL_SECONDS[1])

    def _claim(self, url_hash: str) -> str:
        """On a lease thread: ``DOWNLOAD`` under the URL's lease; ``STORED`` when another run
        stored it since this run looked (it counts as cached; the lease is given back);
        ``HELD`` while another run holds the lease."""
        if not self.saver.leases.take(url_hash):
            return HELD
        if not fetched_meanwhile(self.store, url_hash, self.settings.refetch_errors):
            return DOWNLOAD
        self.saver.leases.release(url_hash)
        with self.saver.lock:
            self.saver.stats.cached += 1
        return STORED


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
                 io: ThreadPoolExecutor, leases: HeldLeases, limit: int = 256) -> None:
        self.store, self.max_pixels, self.stats, self.io = store, max_pixels, stats, io
        self.leases = leases
        self.limit = limit
        self._loop = asyncio.get_running_loop()
        self._room = asyncio.Semaphore(limit)
        self.lock = threading.Lock()
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
        """On a store thread; the URL's lease is given back once its record is stored (or the
        store failed)."""
        try:
            record = save_fetch(self.store, url_hash, url, outcome, self.max_pixels)
            with self.lock:
                self.stats.count(record, outcome)
        except Exception as error:  # handed to drain(), which raises it in the caller
            with self.lock:
                self._failures.append(error)
        finally:
            self._release(url_hash)
            self._loop.call_soon_threadsafe(self._room.release)

    def _release(self, url_hash: str) -> None:
        try:
            self.leases.release(url_hash)
        except Exception as error:  # a store error: the lease expires; drain() raises it
            with self.lock:
                self._failures.append(error)
