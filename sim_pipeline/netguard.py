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
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
# Shared address space (carrier NAT) and IETF protocol assignments, whatever Python's lists say.
_IPV4_NOT_PUBLIC = (ipaddress.IPv4Network("100.64.0.0/10"), ipaddress.IPv4Network("192.0.0.0/24"))
_NUMBER = re.compile(r"^(0[xX][0-9a-fA-F]*|[0-9]+)$")
DNS_CACHE_SECONDS = 60.0


class BlockedAddress(Exception):
    """The host is, or resolves to, an address that user URLs may not reach."""


class UnknownHost(Exception):
    """The host name does not resolve (or names an address that cannot exist)."""


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


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a URL host spells, in any form a resolver might accept; None for a name.

    Besides dotted quads this reads the inet_aton spellings (``2130706433``, ``0x7f.1``,
    ``0177.0.0.1``), so they are judged here instead of being sent to a resolver, and IPv6 with an
    optional zone (``fe80::1%eth0``). A host whose last label is numeric but is no valid address
    raises ``UnknownHost`` (WHATWG URL rules), so it never reaches DNS either.
    """
    host = unquote(host).strip("[]")
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise UnknownHost(host) from None
    labels = host.removesuffix(".").split(".")
    if not _NUMBER.match(labels[-1]):
        return None
    if len(labels) > 4 or not all(_NUMBER.match(label) for label in labels):
        raise UnknownHost(host)
    return _inet_aton([_number(label) for label in labels], host)


def _number(label: str) -> int:
    if label[:2].lower() == "0x":
        return int(label[2:] or "0", 16)
    if len(label) > 1 and label.startswith("0"):
        return int(label, 8) if set(label) <= set("01234567") else -1
    return int(label)


def _inet_aton(parts: list[int], host: str) -> ipaddress.IPv4Address:
    """a, a.b, a.b.c and a.b.c.d: the last part fills the remaining bytes."""
    last_bits = 8 * (5 - len(parts))
    if any(not 0 <= p <= 255 for p in parts[:-1]) or not 0 <= parts[-1] < 1 << last_bits:
        raise UnknownHost(host)
    value = parts[-1]
    for i, part in enumerate(parts[:-1]):
        value |= part << (24 - 8 * i)
    return ipaddress.IPv4Address(value)


@dataclass(frozen=True)
class AllowEntry:
    host: str
    port: int | None


def normalise_host(host: str) -> str:
    """Lower case, IDNA (punycode) for names, the canonical text for IP literals."""
    ip = parse_ip_literal(host)
    if ip is not None:
        return str(ip)
    return httpx.URL(f"http://{host}/").raw_host.decode("ascii").removesuffix(".")


def parse_allowlist(text: str) -> tuple[AllowEntry, ...]:
    """``host[:port]`` entries, comma-separated; IPv6 as ``[::1]:8080``. Without a port: any."""
    entries = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            parts = urlsplit(f"//{item}")
            port, host = parts.port, parts.hostname
            if not host or parts.path or parts.username is not None:
                raise ValueError(item)
            entries.append(AllowEntry(normalise_host(host), port))
        except (ValueError, UnknownHost, httpx.InvalidURL):
            raise ValueError(f"not a host[:port]: {item!r}") from None
    return tuple(entries)


async def system_resolver(host: str, port: int, executor: ThreadPoolExecutor | None = None
                          ) -> list[IPAddress]:
    """getaddrinfo in a thread; every TCP address, in the order the system prefers."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.run_in_executor(
            executor, lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    except socket.gaierror as error:
        if error.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            raise UnknownHost(host) from None
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
                return await self._inner.connect_tcp(
                    str(ip), port, timeout=timeout, local_address=local_address,
                    socket_options=socket_options)
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
