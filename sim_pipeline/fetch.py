"""Stage 2, fetch-images: download each distinct URL of a chunk once and cache it in the store.

Bytes go to ``images/<h[:2]>/<h>`` and a small JSON record beside them (status, content type,
size, sha256, error code). The record is written last, so its presence means "done"; a URL whose
record exists is never fetched again, except a transient failure (timeout, 5xx), which the next
run retries.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from sim_pipeline import errors
from sim_pipeline.config import Settings
from sim_pipeline.layout import ChunkRef, image_key, image_meta_key
from sim_pipeline.plan import read_chunk_rows
from sim_pipeline.preprocess import sniff_image_format
from sim_pipeline.store import ObjectStore, read_json, write_json

MAX_REDIRECTS = 5


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


@dataclass
class FetchStats:
    attempted: int = 0
    ok: int = 0
    cached: int = 0
    bytes: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "errors": dict(sorted(self.errors.items()))}


def needs_fetch(store: ObjectStore, url_hash: str) -> bool:
    if not store.exists(image_meta_key(url_hash)):
        return True
    return errors.is_transient(read_json(store, image_meta_key(url_hash)).get("error"))


async def _download(client: httpx.AsyncClient, url: str, settings: Settings) -> tuple[
        FetchRecord, bytes]:
    """GET one URL with a byte cap enforced while streaming; never raises for network trouble."""
    try:
        async with asyncio.timeout(settings.fetch_timeout), client.stream("GET", url) as response:
            content_type = response.headers.get("content-type")
            if response.status_code != 200:
                return FetchRecord(url, errors.http_error(response.status_code),
                                   response.status_code, content_type), b""
            body = bytearray()
            async for part in response.aiter_bytes():
                body += part
                if len(body) > settings.max_image_bytes:
                    return FetchRecord(url, errors.TOO_LARGE, 200, content_type), b""
    except (TimeoutError, httpx.TimeoutException):
        return FetchRecord(url, errors.TIMEOUT), b""
    except httpx.TooManyRedirects:
        return FetchRecord(url, errors.TOO_MANY_REDIRECTS), b""
    except httpx.UnsupportedProtocol:
        return FetchRecord(url, errors.UNSUPPORTED_SCHEME), b""
    except httpx.InvalidURL:
        return FetchRecord(url, errors.INVALID_URL), b""
    except (httpx.TransportError, httpx.DecodingError):
        return FetchRecord(url, errors.CONNECTION_ERROR), b""
    data = bytes(body)
    image_format = sniff_image_format(data)
    if image_format is None:
        return FetchRecord(url, errors.NOT_AN_IMAGE, 200, content_type, len(data)), b""
    digest = hashlib.sha256(data).hexdigest()
    return FetchRecord(url, None, 200, content_type, len(data), digest, image_format), data


def save_fetch(store: ObjectStore, url_hash: str, record: FetchRecord, data: bytes) -> None:
    if record.error is None:
        store.write_bytes(image_key(url_hash), data)
    write_json(store, image_meta_key(url_hash), asdict(record))


async def fetch_urls(urls: dict[str, str], store: ObjectStore, settings: Settings) -> FetchStats:
    """Fetch ``{url_hash: url}`` concurrently (bounded), caching each result as it arrives."""
    stats = FetchStats()
    limits = httpx.Limits(max_connections=settings.fetch_concurrency,
                          max_keepalive_connections=settings.fetch_concurrency)
    timeout = httpx.Timeout(settings.fetch_timeout)
    semaphore = asyncio.Semaphore(settings.fetch_concurrency)
    headers = {"User-Agent": settings.user_agent, "Accept": "image/*"}

    async with httpx.AsyncClient(follow_redirects=True, max_redirects=MAX_REDIRECTS, limits=limits,
                                 timeout=timeout, headers=headers) as client:

        async def one(url_hash: str, url: str) -> None:
            async with semaphore:
                record, data = await _download(client, url, settings)
            save_fetch(store, url_hash, record, data)
            stats.attempted += 1
            stats.bytes += record.size
            if record.error:
                stats.errors[record.error] += 1
            else:
                stats.ok += 1

        await asyncio.gather(*(one(h, u) for h, u in sorted(urls.items())))
    return stats


def fetch_chunk(chunk: ChunkRef, store: ObjectStore, settings: Settings) -> FetchStats:
    """Fetch every distinct, valid URL of a chunk that the store does not already hold.

    A chunk fetched before (its ``fetch.json`` exists) is not fetched again, so rerunning a run
    sends no requests; transient failures are retried by later runs, not by reruns.
    """
    distinct = {r.url_hash: r.url for r in read_chunk_rows(store, chunk)
                if r.error is None and r.url_hash}
    if store.exists(chunk.fetch_key):
        return FetchStats(cached=len(distinct))
    todo = {h: u for h, u in distinct.items() if needs_fetch(store, h)}
    started = time.monotonic()
    stats = asyncio.run(fetch_urls(todo, store, settings)) if todo else FetchStats()
    stats.cached = len(distinct) - len(todo)
    write_json(store, chunk.fetch_key,
               {**stats.to_dict(), "seconds": round(time.monotonic() - started, 3)})
    return stats
