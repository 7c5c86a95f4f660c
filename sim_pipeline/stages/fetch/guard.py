"""SSRF guard: fetch only from public addresses, and connect to exactly the address checked.

User-supplied URLs must not reach the machine itself, its network or a cloud metadata service
(169.254.169.254). ``GuardedBackend`` sits where httpx opens TCP connections: it resolves the host
once, refuses the connection if any address is not public, and connects to one of the addresses it
checked, so a DNS answer that changes between check and connect (DNS rebinding) cannot slip through.
TLS still uses the host name for SNI and certificate checks, because httpcore passes the URL's host
to ``start_tls``, not the address. Every redirect hop opens its connection through the same guard.

``SIM_PIPELINE_ALLOW_HOSTS`` (``host[:port]``, comma-separated) exempts named hosts: tests serve
from ``127.0.0.1:<port>`` while every other loopback port stays blocked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpcore

from sim_pipeline.core.urls import (
    AllowEntry,
    IPAddress,
    UnknownHost,
    normalise_host,
    parse_ip_literal,
)

Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
# Shared address space (carrier NAT) and IETF protocol assignments, whatever Python's lists say.
_IPV4_NOT_PUBLIC = (ipaddress.IPv4Network("100.64.0.0/10"), ipaddress.IPv4Network("192.0.0.0/24"))
DNS_CACHE_SECONDS = 60.0
# A TLS handshake is a few round trips. A peer that accepts the connection and then says nothing
# to a ClientHello is no TLS server (a plain-HTTP one waiting for a request line, say): that is
# ``tls_error`` within this bound, not ``timeout`` after the whole fetch deadline.
TLS_HANDSHAKE_SECONDS = 5.0


class BlockedAddress(Exception):
    """The host is, or resolves to, an address that user URLs may not reach."""


def is_blocked(ip: IPAddress) -> bool:
    """True unless ``ip`` is a public unicast address; IPv4 embedded in IPv6 is judged as IPv4.

    ``is_global`` alone is not enough: it lets through multicast (224.0.0.0/4, ff0e::/16), and
    which special ranges it knows differs between Python versions; the explicit checks do not.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return is_blocked(embedded)
        if ip in _NAT64_LOCAL or ip.is_site_local:
            return True
    elif any(ip in network for network in _IPV4_NOT_PUBLIC):
        return True
    return (not ip.is_global or ip.is_private or ip.is_loopback or ip.is_link_local
            or ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for: mapped (::ffff:a.b.c.d), 6to4 or NAT64.

    Traffic to these reaches (or is routed by) that IPv4 address, so it alone decides.
    """
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(ip.packed[-4:])
    return None


async def system_resolver(host: str, port: int, executor: ThreadPoolExecutor | None = None
                          ) -> list[IPAddress]:
    """getaddrinfo in a thread; every TCP address, in the order the system prefers.

    Whatever getaddrinfo raises becomes the row's code, never the run's crash: a name it cannot
    even encode (a label over 63 characters, NUL: ``UnicodeError`` / ``ValueError``) or does not
    know is ``UnknownHost``; any other failure is a connection error.
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.run_in_executor(
            executor, lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    except socket.gaierror as error:
        if error.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            raise UnknownHost(host) from None
        raise httpcore.ConnectError(f"cannot resolve {host}: {error}") from None
    except (UnicodeError, ValueError):
        raise UnknownHost(host) from None
    except OSError as error:
        raise httpcore.ConnectError(f"cannot resolve {host}: {error}") from None
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    return list(dict.fromkeys(addresses))


class AddressGuard:
    """Resolves a host and returns the addresses one may connect to, or raises."""

    def __init__(self, allow: Iterable[AllowEntry] = (), resolver: Resolver | None = None,
                 dns_threads: int = 32) -> None:
        self.allow = tuple(allow)
        self._executor = ThreadPoolExecutor(dns_threads, thread_name_prefix="dns")
        self._resolver = resolver or (lambda h, p: system_resolver(h, p, self._executor))
        self._cache: dict[tuple[str, int], tuple[float, list[IPAddress]]] = {}

    def is_allowed(self, host: str, port: int) -> bool:
        host = normalise_host(host)
        return any(e.host == host and e.port in (None, port) for e in self.allow)

    async def addresses(self, host: str, port: int) -> list[IPAddress]:
        """Checked addresses for ``host:port``; ``BlockedAddress`` if any answer is not public."""
        literal = parse_ip_literal(host)
        addresses = [literal] if literal is not None else await self._resolve(host, port)
        if not addresses:
            raise UnknownHost(host)
        if not self.is_allowed(host, port) and any(is_blocked(ip) for ip in addresses):
            raise BlockedAddress(f"{host}:{port} -> {', '.join(map(str, addresses))}")
        return addresses

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        """A short per-guard cache: a chunk's URLs often share a few hosts."""
        now = time.monotonic()
        hit = self._cache.get((host, port))
        if hit is not None and hit[0] > now:
            return hit[1]
        addresses = await self._resolver(host, port)
        self._cache[(host, port)] = (now + DNS_CACHE_SECONDS, addresses)
        return addresses

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class TlsHandshakeFailed(httpcore.ConnectError):
    """The peer did not complete a TLS handshake within ``TLS_HANDSHAKE_SECONDS``."""


class _HandshakeBound(httpcore.AsyncNetworkStream):
    """A TCP stream whose TLS handshake is bounded by ``TLS_HANDSHAKE_SECONDS``."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        bound = min(timeout or TLS_HANDSHAKE_SECONDS, TLS_HANDSHAKE_SECONDS)
        try:
            return await self._inner.start_tls(ssl_context, server_hostname, bound)
        except httpcore.ConnectTimeout:
            raise TlsHandshakeFailed(f"no TLS handshake within {bound:g} s") from None

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to addresses the guard has checked."""

    def __init__(self, guard: AddressGuard) -> None:
        self.guard = guard
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        addresses = await self.guard.addresses(host, port)
        failure: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for ip in addresses:
            try:
                return _HandshakeBound(await self._inner.connect_tcp(
                    str(ip), port, timeout=timeout, local_address=local_address,
                    socket_options=socket_options))
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                failure = error
        assert failure is not None  # addresses is never empty
        raise failure

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:
        raise BlockedAddress(f"unix socket {path}")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
