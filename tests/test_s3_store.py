"""The S3 object store against a real S3 server (SeaweedFS on loopback)."""

from __future__ import annotations

import hashlib
import threading
import uuid

import boto3
import pytest

from sim_pipeline.core.config import Settings
from sim_pipeline.core.errors import UserError
from sim_pipeline.core.layout import ChunkRef, image_key, image_meta_key
from sim_pipeline.core.store import IntegrityError, S3Store, open_store, read_json
from sim_pipeline.stages.fetch.chunk import fetch_chunk
from sim_pipeline.stages.plan import normalise_row, write_chunks
from tests.conftest import make_image
from tests.origin import Origin
from tests.seaweed import SeaweedFS

pytest_plugins = ["tests.plugin_fetch", "tests.plugin_s3"]
pytestmark = pytest.mark.usefixtures("loopback_only")


def s3_store(server: SeaweedFS) -> S3Store:
    """A fresh prefix per test: tests share the bucket, never each other's keys."""
    store = open_store(f"s3://{server.bucket}/t-{uuid.uuid4().hex[:8]}")
    assert isinstance(store, S3Store)
    return store


def raw_client() -> object:
    return boto3.client("s3")


def test_round_trip_with_prefix_and_integrity_metadata(s3_env: SeaweedFS) -> None:
    store = s3_store(s3_env)
    key = image_key("ab" + "0" * 62)
    assert not store.exists(key)
    store.write_bytes(key, b"\x89PNG image bytes")
    assert store.exists(key)
    assert store.read_bytes(key) == b"\x89PNG image bytes"
    assert store.uri(key) == f"s3://{s3_env.bucket}/{store.prefix}/images/ab/ab{'0' * 62}"
    head = raw_client().head_object(Bucket=s3_env.bucket, Key=f"{store.prefix}/{key}")
    assert head["Metadata"]["sha256"] == hashlib.sha256(b"\x89PNG image bytes").hexdigest()


def test_a_missing_key_is_a_key_error(s3_env: SeaweedFS) -> None:
    with pytest.raises(KeyError):
        s3_store(s3_env).read_bytes("nothing/here")


def test_concurrent_writers_of_one_key_leave_one_whole_object(s3_env: SeaweedFS) -> None:
    store = s3_store(s3_env)
    payloads = [bytes([i]) * (200_000 + i) for i in range(8)]
    barrier = threading.Barrier(len(payloads))

    def write(data: bytes) -> None:
        barrier.wait()
        store.write_bytes("same/key", data)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.read_bytes("same/key") in payloads  # whole, and its digest checks out


def test_create_bytes_lets_exactly_one_concurrent_writer_win(s3_env: SeaweedFS) -> None:
    store = s3_store(s3_env)
    barrier = threading.Barrier(6)
    wins: list[bytes] = []

    def create(data: bytes) -> None:
        barrier.wait()
        if store.create_bytes("first/wins", data):
            wins.append(data)

    threads = [threading.Thread(target=create, args=(bytes([i]) * 1000,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(wins) == 1
    assert store.read_bytes("first/wins") == wins[0]


def test_a_damaged_object_fails_its_read(s3_env: SeaweedFS) -> None:
    store = s3_store(s3_env)
    store.write_bytes("k", b"original")
    raw_client().put_object(Bucket=s3_env.bucket, Key=f"{store.prefix}/k", Body=b"tampered",
                            Metadata={"sha256": hashlib.sha256(b"original").hexdigest()})
    with pytest.raises(IntegrityError, match="damaged"):
        store.read_bytes("k")


def test_a_missing_bucket_is_a_clear_error(s3_env: SeaweedFS) -> None:
    with pytest.raises(UserError, match="Bucket 'no-such-bucket-here' does not exist.*create it"):
        open_store("s3://no-such-bucket-here/prefix")


def test_wrong_credentials_are_a_clear_error(s3_env: SeaweedFS,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(UserError, match="S3 refused the credentials.*AWS_SECRET_ACCESS_KEY"):
        open_store(f"s3://{s3_env.bucket}/x")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody-we-know")
    with pytest.raises(UserError, match="S3 refused the credentials"):
        open_store(f"s3://{s3_env.bucket}/x")


def test_fetch_stage_caches_images_in_s3(s3_env: SeaweedFS, origin: Origin,
                                         fetch_settings: Settings) -> None:
    store = s3_store(s3_env)
    body = make_image(seed=3)
    url = origin.add("/s3/cat.jpg", body=body)
    rows = [normalise_row(i, url, f"caption {i}", [url]) for i in range(3)]
    (chunk,) = write_chunks(store, "s3-run", "digest", rows, 10)
    stats = fetch_chunk(chunk, store, fetch_settings)
    assert (stats.attempted, stats.ok) == (1, 1)
    url_hash = rows[0].url_hash
    assert store.read_bytes(image_key(url_hash)) == body
    assert read_json(store, image_meta_key(url_hash))["sha256"] == hashlib.sha256(body).hexdigest()
    again = ChunkRef("s3-run-2", "digest", 0, 0, 3)
    store.write_bytes(again.rows_key, store.read_bytes(chunk.rows_key))
    assert fetch_chunk(again, store, fetch_settings).cached == 1
    assert origin.requests["/s3/cat.jpg"] == 1
