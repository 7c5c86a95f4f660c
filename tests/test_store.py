"""The local-folder object store: atomic writes, concurrent writers, verified reads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from sim_pipeline.core.errors import UserError
from sim_pipeline.core.store import IntegrityError, LocalStore, open_store


def run_together(count: int, work: object) -> None:
    barrier = threading.Barrier(count)

    def start(i: int) -> None:
        barrier.wait()
        work(i)  # type: ignore[operator]

    threads = [threading.Thread(target=start, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_round_trip_leaves_no_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.write_bytes("images/ab/abc", b"bytes")
    assert store.exists("images/ab/abc") and store.read_bytes("images/ab/abc") == b"bytes"
    assert [p.name for p in (tmp_path / "images/ab").iterdir()] == ["abc"]
    with pytest.raises(KeyError):
        store.read_bytes("images/ab/missing")
    with pytest.raises(ValueError, match="escapes"):
        store.write_bytes("../outside", b"x")


def test_concurrent_writers_of_one_key_leave_one_whole_file(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    payloads = [bytes([i]) * (1_000_000 + i) for i in range(8)]
    seen: list[bytes] = []

    def write_and_read(i: int) -> None:
        store.write_bytes("same", payloads[i])
        seen.append(store.read_bytes("same"))  # never half of one, never a digest mismatch

    run_together(len(payloads), write_and_read)
    assert store.read_bytes("same") in payloads and all(s in payloads for s in seen)
    assert [p.name for p in tmp_path.iterdir()] == ["same"]


def test_create_bytes_lets_exactly_one_writer_win(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    wins: list[int] = []
    run_together(8, lambda i: store.create_bytes("first", bytes([i]) * 1000) and wins.append(i))
    assert len(wins) == 1 and store.read_bytes("first") == bytes([wins[0]]) * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["first"]


def test_a_damaged_file_fails_its_read(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.write_bytes("k", b"original bytes")
    with (tmp_path / "k").open("r+b") as handle:  # same inode, so the recorded digest stays
        handle.write(b"X")
    with pytest.raises(IntegrityError, match="damaged"):
        store.read_bytes("k")


def test_a_file_written_by_hand_is_read_unverified(tmp_path: Path) -> None:
    (tmp_path / "by-hand").write_bytes(b"anything")
    assert LocalStore(tmp_path).read_bytes("by-hand") == b"anything"


def test_store_locations(tmp_path: Path) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    for bad in ["s3://", "gs://bucket/x"]:
        with pytest.raises(UserError):
            open_store(bad)
