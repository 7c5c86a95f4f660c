"""Loopback-only parts for the fetch tests: a scriptable origin server, a fake DNS, helpers.

The fixtures built from them live in ``tests/plugin_fetch.py``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from sim_pipeline.core.config import Settings
from sim_pipeline.core.layout import image_meta_key, sha256_hex
from sim_pipeline.core.store import LocalStore, read_json
from sim_pipeline.core.urls import IPAddress, UnknownHost
from sim_pipeline.devtools.local_http import QueueingHTTPServer
from sim_pipeline.stages.fetch.loop import fetch_urls
from sim_pipeline.stages.fetch.records import FetchStats

HONEST = -1  # Reply.length: declare the real body length


@dataclass
class Reply:
    """One scripted response. ``length``: HONEST, None (no Content-Length) or a declared lie."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "image/jpeg"
    length: int | None = HONEST
    delay: float = 0.0  # before the status line
    drip: float = 0.0  # between 1 KB pieces of the body
    stream: int = 0  # filler bytes sent after the body, in 64 KB pieces
    hang_up: bool = False  # close the connection after replying, without saying so


class Origin:
    """An HTTP server on 127.0.0.1 playing scripted replies; counts what it receives and sends."""

    def __init__(self, host: str = "127.0.0.1", keep_alive: bool = False,
                 tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, list[Reply]] = {}
        self.requests: Counter[str] = Counter()
        self.headers: dict[str, list[dict[str, str]]] = {}
        self.sent: Counter[str] = Counter()
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        handler = _handler(self, "HTTP/1.1" if keep_alive else "HTTP/1.0")
        self.connections = 0
        server_class = type("Server", (QueueingHTTPServer,), {"address_family": family})
        self.httpd = server_class((host, 0), handler)
        self.httpd.daemon_threads = True
        self.host, self.port = host, self.httpd.server_address[1]
        self.server_names: list[str | None] = []  # TLS SNI, one per handshake
        if tls is not None:
            tls.sni_callback = lambda _sock, name, _ctx: self.server_names.append(name)
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    def add(self, path: str, *replies: Reply, **one: Any) -> str:
        """Serve ``replies`` in turn (the last one repeats), or one ``Reply(**one)``."""
        self.routes[path] = list(replies) or [Reply(**one)]
        return self.url(path)

    def total(self) -> int:
        with self.lock:
            return sum(self.requests.values())

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _next(self, path: str) -> Reply:
        with self.lock:
            self.requests[path] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            replies = self.routes.get(path, [Reply(404, b"not found", content_type="text/plain")])
            return replies[min(self.requests[path], len(replies)) - 1]


def _handler(origin: Origin, protocol: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = protocol

        def setup(self) -> None:
            super().setup()
            with origin.lock:
                origin.connections += 1

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path
            with origin.lock:
                origin.headers.setdefault(path, []).append(dict(self.headers.items()))
            reply = origin._next(path)
            self.counted = True
            try:
                self._play(reply, path)
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                self._finished()

        def _finished(self) -> None:
            """Out of ``in_flight`` before the response's last bytes go out: a client that has
            them may send its next request at once, which must not find this one counted."""
            if self.counted:
                self.counted = False
                with origin.lock:
                    origin.in_flight -= 1

        def _play(self, reply: Reply, path: str) -> None:
            time.sleep(reply.delay)
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            if reply.length is not None:
                length = len(reply.body) if reply.length == HONEST else reply.length
                self.send_header("Content-Length", str(length))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            pieces = [reply.body[i:i + 1024] for i in range(0, len(reply.body), 1024)] \
                if reply.drip else [reply.body]
            writes = [(piece, reply.drip) for piece in pieces]
            writes += [(b"\0" * 65536, 0)] * (reply.stream // 65536)
            for number, (data, pause) in enumerate(writes, 1):
                if number == len(writes):
                    self._finished()
                self._send(data, path)
                time.sleep(pause)
            if reply.hang_up:
                self.close_connection = True

        def _send(self, data: bytes, path: str) -> None:
            self.wfile.write(data)
            self.wfile.flush()
            with origin.lock:
                origin.sent[path] += len(data)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


class FakeDNS:
    """A resolver that knows only the names it is given, and counts its lookups."""

    def __init__(self, names: dict[str, list[str]] | None = None) -> None:
        self.names = names or {}
        self.calls: Counter[str] = Counter()

    async def __call__(self, host: str, port: int) -> list[IPAddress]:
        self.calls[host] += 1
        await asyncio.sleep(0)
        if host not in self.names:
            raise UnknownHost(host)
        return [ipaddress.ip_address(a) for a in self.names[host]]


def is_loopback(host: str) -> bool:
    """An IP literal on this machine (127.0.0.0/8, ::1, or IPv4-mapped loopback)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def fetch_records(urls: list[str], settings: Settings, resolver: FakeDNS | None = None
              ) -> tuple[dict[str, dict[str, Any]], FetchStats]:
    """Run the fetch stage on ``urls``; return each URL's stored record, and the stats."""
    store = LocalStore(settings.store)
    hashes = {sha256_hex(url): url for url in urls}
    stats = asyncio.run(fetch_urls(hashes, store, settings, resolver or FakeDNS()))
    return {url: read_json(store, image_meta_key(h)) for h, url in hashes.items()}, stats


def fetch_one(url: str, settings: Settings, resolver: FakeDNS | None = None) -> dict[str, Any]:
    records, _ = fetch_records([url], settings, resolver)
    return records[url]
