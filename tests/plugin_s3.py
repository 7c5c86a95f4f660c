"""Fixtures for the S3 tests, loaded with ``pytest_plugins = ["tests.plugin_s3"]``."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.seaweed import SeaweedFS, start_seaweedfs, stop


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    process, ports, server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        stop(process, ports)


@pytest.fixture
def s3_env(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> SeaweedFS:
    """Point boto3 at the test server through the standard AWS variables, for one test."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    return seaweedfs
