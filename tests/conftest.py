"""Real parts for the tests: a tiny CLIP checkpoint, an image server on loopback, PostgreSQL.

PostgreSQL is the server on 127.0.0.1:5432 (or ``SIM_TEST_PG_ADMIN_URL``) when one answers, else a
throwaway cluster this session starts from the system's binaries (tests/support/postgres.py).
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sim_pipeline.core.config import Settings
from sim_pipeline.devtools.local_http import QueueingHTTPServer
from sim_pipeline.devtools.random_model import build_random_clip
from tests.support import postgres


def make_image(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (96, 64),
               mode: str = "RGB") -> bytes:
    """Deterministic, distinct-looking pixels so different images get different embeddings."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize(size, Image.NEAREST).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    content_type: str = "image/jpeg"
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


def _closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ImageServer:
    """A real HTTP server on 127.0.0.1 that serves registered routes and counts requests."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                with server._lock:
                    server.requests[self.path] += 1
                route = server.routes.get(self.path, Route(404, b"not found", "text/plain"))
                if route.delay:
                    time.sleep(route.delay)
                try:
                    self.send_response(route.status)
                    self.send_header("Content-Type", route.content_type)
                    self.send_header("Content-Length", str(len(route.body)))
                    for name, value in route.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(route.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = QueueingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.closed_port = _closed_port()
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def allow_hosts(self) -> str:
        """The allowlist that lets the fetcher reach this server and the closed port, no more."""
        return f"127.0.0.1:{self.port},127.0.0.1:{self.closed_port}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def add(self, path: str, route: Route) -> str:
        self.routes[path] = route
        return self.url(path)

    def total_requests(self) -> int:
        with self._lock:
            return sum(self.requests.values())


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight CLIP (meaningless scores) with the real CLIP tokenizer."""
    return build_random_clip(tmp_path_factory.mktemp("tiny-clip"), shape="tiny")


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """The admin URL of a PostgreSQL server: the local one, or one started for this session."""
    try:
        with postgres.admin_url() as url:
            yield url
    except postgres.PostgresUnavailable as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """A throwaway database on that server, dropped after the session."""
    with postgres.database(pg_admin_url) as url:
        yield url


@pytest.fixture
def settings(tmp_path: Path, tiny_model: Path, image_server: ImageServer) -> Settings:
    return Settings(model=str(tiny_model), store=str(tmp_path / "store"),
                    database_url=f"sqlite:///{tmp_path / 'results.db'}", device="cpu",
                    precision="fp32", batch_size=8, fetch_timeout=3.0, fetch_concurrency=8,
                    allow_hosts=image_server.allow_hosts)
