"""Fixtures for the fetch tests, loaded with ``pytest_plugins = ["tests.plugin_fetch"]``.

Modules that use them also mark themselves ``usefixtures("loopback_only")``: any attempt to connect
to (or resolve) something off this machine then fails the test before a packet leaves. The fetch
tests exercise an SSRF guard, and a bug in it must not become traffic to 169.254.169.254.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sim_pipeline.core.config import Settings
from tests.origin import Origin, is_loopback


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test on any connect or name lookup that could leave this machine."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def check(address: Any) -> None:
        if isinstance(address, tuple) and not is_loopback(str(address[0])):
            raise AssertionError(f"test tried to connect to {address[0]} (not loopback)")

    def connect(self: socket.socket, address: Any) -> None:
        check(address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(address)
        return real_connect_ex(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name is not None and name != "localhost" and not is_loopback(name):
            raise AssertionError(f"test tried to resolve {name!r} (not a loopback literal)")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = Origin()
    yield server
    server.close()


@pytest.fixture
def canary() -> Iterator[Origin]:
    """A second loopback port that must never receive a request."""
    server = Origin()
    yield server
    server.close()
    assert server.total() == 0, f"the canary was reached: {dict(server.requests)}"


@pytest.fixture
def fetch_settings(tmp_path: Path, origin: Origin) -> Settings:
    """Only the origin's port is allowed; 1 MB cap; short deadline; fast retries."""
    return Settings(store=str(tmp_path / "store"), allow_hosts=f"127.0.0.1:{origin.port}",
                    fetch_timeout=2.0, fetch_concurrency=8, max_image_bytes=1_000_000,
                    fetch_retries=2)
