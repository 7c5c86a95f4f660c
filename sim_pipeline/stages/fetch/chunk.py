"""Stage 2, fetch-images: download each distinct URL of a chunk once and cache it in the store.

Bytes go to ``images/<h[:2]>/<h>`` and a small JSON record beside them (status, content type,
size, sha256, format, pixel size, error code). The record is written last, so its presence means
"done". A URL with a record is never fetched again, with two exceptions: a transient failure
(timeout, connection error, 408, 429, 5xx) is retried by the next run, and any other failure when
``--refetch-errors`` is given. How one URL is downloaded (safety, limits, retries) is ``download``.
"""

from __future__ import annotations

import asyncio
import os
import time

from sim_pipeline.core.config import Settings
from sim_pipeline.core.layout import ChunkRef
from sim_pipeline.core.store import ObjectStore, write_json
from sim_pipeline.stages.fetch import workers
from sim_pipeline.stages.fetch.guard import Resolver
from sim_pipeline.stages.fetch.loop import fetch_urls
from sim_pipeline.stages.fetch.records import FetchStats
from sim_pipeline.stages.known import previous_fetched, records_of, write_fetched
from sim_pipeline.stages.plan import read_chunk_table, scorable_keys

MIN_URLS_PER_PROCESS = 1000


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
    """``fetch_urls`` in this process, or split over worker processes (``workers``) so a
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
    for part in workers.run(jobs):
        total.add(part)
    return total


def fetch_chunk(chunk: ChunkRef, store: ObjectStore, settings: Settings,
                resolver: Resolver | None = None) -> FetchStats:
    """Fetch every distinct, valid URL of a chunk that the store does not already hold.

    A chunk fetched before (its ``fetch.json`` exists) is not fetched again, so rerunning a run
    sends no requests; transient failures are retried by later runs, not by reruns. URLs the
    previous chunk's index knows (``known``) are not looked up one by one.
    """
    distinct, _ = scorable_keys(read_chunk_table(store, chunk))
    if store.exists(chunk.fetch_key):
        return FetchStats(cached=len(distinct))
    started = time.monotonic()
    earlier = previous_fetched(store, chunk, settings.refetch_errors)
    unknown = {h: url for h, url in distinct.items() if h not in earlier}
    stats = fetch_all(unknown, store, settings, resolver) if unknown else FetchStats()
    stats.cached += len(distinct) - len(unknown)
    own = {h: earlier[h] for h in distinct if h in earlier} | records_of(store, sorted(unknown))
    write_fetched(store, chunk, own, earlier)
    write_json(store, chunk.fetch_key,
               {**stats.to_dict(), "seconds": round(time.monotonic() - started, 3)})
    return stats
