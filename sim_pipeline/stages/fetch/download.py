"""Download one image URL: SSRF-guarded, size-capped, deadline-bound, polite, retried.

A ``Downloader`` serves one chunk: it shares the connection pool, the address guard (see
``netguard``), a global concurrency limit and a per-host limit. Redirects are followed by hand so
every hop's URL is checked (scheme, credentials) and its connection goes through the guard. The
byte cap is enforced while streaming and also on gzip/deflate output, so a small body cannot expand
past it in memory. ``X-Robots-Tag: noai`` / ``noimageai`` is read from the headers and the body is
never downloaded. Connection errors, 408, 429 and 5xx are retried with exponential backoff and
jitter, honouring Retry-After up to ``MAX_RETRY_AFTER``; other 4xx never are.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import re
import ssl
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from types import TracebackType

import httpcore
import httpx

from sim_pipeline.core import errors
from sim_pipeline.core.config import Settings
from sim_pipeline.core.urls import UnknownHost, parse_allowlist, url_problem
from sim_pipeline.stages.fetch.connections import Connections
from sim_pipeline.stages.fetch.guard import (
    AddressGuard,
    BlockedAddress,
    GuardedBackend,
    Resolver,
    TlsHandshakeFailed,
)

MAX_REDIRECTS = 5
MAX_RETRY_AFTER = 30.0  # seconds; a server asking for longer is left to a later run
BACKOFF_BASE = 0.5
BACKOFF_MAX = 8.0
REDIRECTS = frozenset({301, 302, 303, 307, 308})
OPT_OUT = frozenset({"noai", "noimageai"})
_VALUED_RULES = frozenset({"unavailable_after", "max-snippet", "max-image-preview",
                           "max-video-preview"})


@dataclass(frozen=True)
class Outcome:
    """What one URL gave: bytes, or an error code; never an exception."""

    error: str | None
    status: int | None = None
    content_type: str | None = None
    data: bytes = b""
    retry_after: float | None = None
    retries: int = 0
    seconds: float = 0.0


def robots_opt_out(values: Iterable[str], product: str) -> bool:
    """True if an X-Robots-Tag value says noai/noimageai to everyone or to ``product``.

    ``X-Robots-Tag: otherbot: noai`` addresses only otherbot; ``max-snippet: 20`` is a rule with a
    value, not a bot name.
    """
    for value in values:
        head, colon, rest = value.partition(":")
        agent = head.strip().lower()
        scoped = bool(colon) and bool(agent) and agent not in _VALUED_RULES \
            and not re.search(r"[\s,]", agent)
        if scoped and agent != product.lower():
            continue
        directives = rest if scoped else value
        if OPT_OUT & {d.strip().lower() for d in directives.split(",")}:
            return True
    return False


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from ``Retry-After`` (delta-seconds or an HTTP date); None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def backoff(attempt: int, rng: Callable[[float, float], float] = random.uniform) -> float:
    """Exponential backoff with equal jitter: half fixed, half random, capped."""
    ceiling = min(BACKOFF_MAX, BACKOFF_BASE * 2**attempt)
    return ceiling / 2 + rng(0.0, ceiling / 2)


class TooLarge(Exception):
    pass


class _Body:
    """Accumulates a response body, decoding gzip/deflate, refusing to grow past ``cap``."""

    def __init__(self, content_encoding: str | None, cap: int) -> None:
        encoding = (content_encoding or "identity").strip().lower()
        if encoding not in ("identity", "gzip", "x-gzip", "deflate"):
            raise ValueError(encoding)
        # wbits 47: zlib or gzip header, detected from the data.
        self._inflate = None if encoding == "identity" else zlib.decompressobj(wbits=47)
        self.cap, self.data = cap, bytearray()

    def feed(self, raw: bytes) -> None:
        room = self.cap + 1 - len(self.data)
        self.data += raw if self._inflate is None else self._inflate.decompress(raw, room)
        if len(self.data) > self.cap:
            raise TooLarge


class Downloader:
    """Shared state for fetching many URLs concurrently; use as ``async with``."""

    def __init__(self, settings: Settings, resolver: Resolver | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.settings = settings
        self.product = settings.user_agent.split("/", 1)[0].split(" ", 1)[0]
        self.guard = AddressGuard(parse_allowlist(settings.allow_hosts), resolver)
        # Our own connections, no httpx client: no cookies carried between sites, no proxy or
        # .netrc from the environment, redirects are ours to follow, and every TCP connection
        # is opened by the guard.
        self.connections = Connections(GuardedBackend(self.guard), settings.fetch_concurrency,
                                       ssl_context)
        self.headers = [(b"User-Agent", settings.user_agent.encode("ascii", "replace")),
                        (b"Accept", b"image/*"), (b"Accept-Encoding", b"identity")]
        self.timeouts = httpx.Timeout(settings.fetch_timeout).as_dict()
        self._slots = asyncio.Semaphore(settings.fetch_concurrency)
        self._host_slots: defaultdict[bytes, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(settings.fetch_per_host))

    async def __aenter__(self) -> Downloader:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self.connections.aclose()
        self.guard.close()

    async def fetch(self, url: str) -> Outcome:
        """Download ``url`` with retries; the deadline applies to each attempt. ``seconds``:
        from the first request to the final answer, retries and their waits included."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            return Outcome(errors.INVALID_URL)
        host_slots = self._host_slots[parsed.netloc]  # redirect hops share the first host's slot
        attempt, started = 0, None
        while True:
            async with host_slots, self._slots:
                started = started or time.monotonic()  # latency excludes the wait for a slot
                outcome = await self._attempt(parsed)
            wait = self._retry_wait(outcome, attempt)
            if wait is None:
                return replace(outcome, retries=attempt, seconds=time.monotonic() - started)
            await asyncio.sleep(wait)  # holding no slot: other URLs use it meanwhile
            attempt += 1

    def _retry_wait(self, outcome: Outcome, attempt: int) -> float | None:
        if attempt >= self.settings.fetch_retries or not errors.retry_now(outcome.error):
            return None
        if outcome.retry_after is None:
            return backoff(attempt)
        if outcome.retry_after > MAX_RETRY_AFTER:
            return None
        return outcome.retry_after + random.uniform(0.0, BACKOFF_BASE / 2)

    async def _attempt(self, url: httpx.URL) -> Outcome:
        try:
            async with asyncio.timeout(self.settings.fetch_timeout):
                return await self._follow(url)
        except TimeoutError:
            return Outcome(errors.TIMEOUT)
        except BlockedAddress:
            return Outcome(errors.BLOCKED_ADDRESS)
        except UnknownHost:
            return Outcome(errors.DNS_ERROR)
        except httpx.InvalidURL:
            return Outcome(errors.INVALID_URL)
        except httpcore.TimeoutException:
            return Outcome(errors.TIMEOUT)
        except (httpcore.NetworkError, httpcore.ProtocolError) as error:
            return Outcome(errors.TLS_ERROR if _from_tls(error) else errors.CONNECTION_ERROR)

    async def _follow(self, url: httpx.URL) -> Outcome:
        """GET, following up to ``MAX_REDIRECTS`` redirects, each hop checked like the first."""
        for _hop in range(MAX_REDIRECTS + 1):
            if problem := url_problem(url):
                return Outcome(problem)
            async with self.connections.get(url, self.headers, self.timeouts) as response:
                headers = httpx.Headers(response.headers)
                location = headers.get("location")
                if response.status not in REDIRECTS or not location:
                    return await self._read(response, headers)
            url = url.join(location)
        return Outcome(errors.TOO_MANY_REDIRECTS)

    async def _read(self, response: httpcore.Response, headers: httpx.Headers) -> Outcome:
        """Status, opt-out and size checks on the headers; then the body, capped."""
        status = response.status
        content_type = headers.get("content-type")
        if status != 200:
            return Outcome(errors.http_error(status), status, content_type,
                           retry_after=parse_retry_after(headers.get("retry-after")))
        if robots_opt_out(headers.get_list("x-robots-tag"), self.product):
            return Outcome(errors.ROBOTS_DISALLOWED, status, content_type)
        cap = self.settings.max_image_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:  # an honest "too big" saves the download
            return Outcome(errors.TOO_LARGE, status, content_type)
        try:
            body = _Body(headers.get("content-encoding"), cap)
            async for raw in response.aiter_stream():
                body.feed(raw)
        except TooLarge:
            return Outcome(errors.TOO_LARGE, status, content_type)
        except (ValueError, zlib.error):  # an encoding we did not ask for and cannot read
            return Outcome(errors.NOT_AN_IMAGE, status, content_type)
        return Outcome(None, status, content_type, bytes(body.data))


def _from_tls(error: BaseException) -> bool:
    """A failed TLS handshake or certificate check, or a peer that never answered the handshake
    (no TLS server): retrying would not change it."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLError | TlsHandshakeFailed):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
