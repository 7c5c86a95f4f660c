"""What a URL and a host are, checked before any network use: one check for plan and fetch.

``url_problem`` gives a row its code when its URL cannot be fetched at all (``invalid_url``,
``unsupported_scheme``, ``credentials_in_url``); the planner applies it to every input URL and the
fetcher to every redirect hop. Host parsing lives here too, because the SSRF guard and the
``SIM_PIPELINE_ALLOW_HOSTS`` setting must read a host exactly as the check does.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import httpx

from sim_pipeline.core import errors

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NUMBER = re.compile(r"^(0[xX][0-9a-fA-F]*|[0-9]+)$")
MAX_HOST_CHARS = 253  # the longest name DNS can carry (RFC 1035), trailing dot not counted
MAX_PORT = 65535  # TCP ports are 1-65535; httpx reads any digits (``:99999``, ``:-1``) as a port


class UnknownHost(Exception):
    """The host name does not resolve (or names an address that cannot exist)."""


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


def url_problem(url: str | httpx.URL) -> str | None:
    """The code for a URL we refuse before any network use, or None when it may be fetched.

    Any exception while reading the URL (an IDNA label over 63 characters, a bad port, a bracket
    left open) makes it ``invalid_url``, as do a port no TCP connection can use (0, negative,
    above 65535) and a host name no resolver accepts (a label over 63 characters, an empty label,
    more than 253 characters): no URL can crash a run.
    """
    if isinstance(url, str) and (not url or any(c.isspace() or ord(c) < 32 for c in url)):
        return errors.INVALID_URL
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
        scheme, host = parsed.scheme, parsed.raw_host.decode("ascii")
        has_credentials = bool(parsed.userinfo)
        port = parsed.port
    except (httpx.InvalidURL, UnicodeError, ValueError, TypeError):
        return errors.INVALID_URL
    if not scheme or (port is not None and not 0 < port <= MAX_PORT):
        return errors.INVALID_URL
    if scheme not in ("http", "https"):
        return errors.UNSUPPORTED_SCHEME
    if has_credentials:
        return errors.CREDENTIALS_IN_URL
    try:
        if parse_ip_literal(host) is None:
            host.encode("idna")  # labels of 1-63 characters, as the resolver will require
    except (UnknownHost, UnicodeError):
        return errors.INVALID_URL
    fits = 0 < len(host.removesuffix(".")) <= MAX_HOST_CHARS
    return None if fits else errors.INVALID_URL
