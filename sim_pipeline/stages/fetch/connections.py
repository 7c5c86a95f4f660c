"""Keep-alive HTTP/1.1 connections by origin, at a constant cost per request.

httpcore's own pool rescans every connection (with a ``poll`` each) on every request and release,
so its cost grows with the pool: at 64 connections a loopback benchmark fell from ~1,200 to ~200
images/s. The fetcher needs less than that pool offers (one request per connection at a time, no
HTTP/2, no proxies; its own semaphores bound the number of connections), so it keeps idle
connections in a stack per origin and hands each request one of them or a new one.
"""

from __future__ import annotations

import ssl
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpcore
import httpx

KEEPALIVE_SECONDS = 5.0
_STALE = (httpcore.RemoteProtocolError, httpcore.ReadError, httpcore.WriteError)
OriginKey = tuple[bytes, bytes, int]  # httpcore.Origin is not hashable


class Connections:
    """Idle connections per origin (most recent first), at most ``max_idle`` of them in all."""

    def __init__(self, network_backend: httpcore.AsyncNetworkBackend, max_idle: int,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._backend = network_backend
        self._ssl_context = ssl_context or httpx.create_ssl_context(trust_env=False)
        self._idle: defaultdict[OriginKey, list[httpcore.AsyncHTTPConnection]] = defaultdict(list)
        self._idle_count = 0
        self._max_idle = max_idle

    @asynccontextmanager
    async def get(self, url: httpx.URL, headers: list[tuple[bytes, bytes]],
                  timeouts: dict[str, float | None]) -> AsyncIterator[httpcore.Response]:
        """GET ``url`` and yield the streaming response; the connection goes back to the pool
        only when the response was read to its end and nothing went wrong."""
        origin = httpcore.Origin(url.raw_scheme, url.raw_host, url.port or _default_port(url))
        connection, reused = await self._take(origin)
        core_request = httpcore.Request(
            b"GET", httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port,
                                 target=url.raw_path),
            headers=[(b"Host", url.netloc), *headers], extensions={"timeout": timeouts})
        try:
            try:
                response = await connection.handle_async_request(core_request)
            except _STALE:
                if not reused:
                    raise
                # The server closed the idle connection meanwhile: once more, on a new one.
                await connection.aclose()
                connection, _ = await self._take(origin, reuse=False)
                response = await connection.handle_async_request(core_request)
            try:
                yield response
            finally:
                await response.aclose()
        except BaseException:
            await connection.aclose()
            raise
        await self._put(origin, connection)

    async def _take(self, origin: httpcore.Origin, reuse: bool = True
                    ) -> tuple[httpcore.AsyncHTTPConnection, bool]:
        """The most recently used idle connection to ``origin``, or a new one (it connects,
        through the guarded backend, when the request is sent). Whether the server closed an
        idle one is found out by using it: probing each socket first costs more."""
        stack = self._idle[_key(origin)]
        while reuse and stack:
            connection = stack.pop()
            self._idle_count -= 1
            if connection.is_idle():
                return connection, True
            await connection.aclose()
        return httpcore.AsyncHTTPConnection(origin, ssl_context=self._ssl_context,
                                            keepalive_expiry=KEEPALIVE_SECONDS,
                                            network_backend=self._backend), False

    async def _put(self, origin: httpcore.Origin,
                   connection: httpcore.AsyncHTTPConnection) -> None:
        if connection.is_idle() and self._idle_count < self._max_idle:
            self._idle[_key(origin)].append(connection)
            self._idle_count += 1
        else:
            await connection.aclose()

    async def aclose(self) -> None:
        for stack in self._idle.values():
            for connection in stack:
                await connection.aclose()
        self._idle.clear()
        self._idle_count = 0


def _key(origin: httpcore.Origin) -> OriginKey:
    return origin.scheme, origin.host, origin.port


def _default_port(url: httpx.URL) -> int:
    return 443 if url.scheme == "https" else 80
