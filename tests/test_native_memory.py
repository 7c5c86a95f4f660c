"""Dropping a copied checkpoint tensor's pages frees resident memory and loses no data."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from sim_pipeline.stages.embed.native_memory import (
    checkpoint_mappings,
    drop_mapped_pages,
    return_free_memory,
)

SIZE = 32 * 2**20


def resident_file_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_dropping_a_checkpoint_range_unloads_it_and_rereads_the_file(tmp_path: Path) -> None:
    values = np.random.default_rng(0).integers(0, 255, SIZE, dtype=np.uint8)
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(values.tobytes())
    with checkpoint.open("rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)  # private, as safetensors
    array = np.frombuffer(mapped, dtype=np.uint8)
    assert int(array.sum(dtype=np.int64)) == int(values.sum(dtype=np.int64))  # all pages resident
    ranges = checkpoint_mappings()
    address = array.ctypes.data
    assert any(start <= address < end for start, end in ranges)
    before = resident_file_mb()
    assert drop_mapped_pages(address, array.nbytes, ranges)
    assert before - resident_file_mb() >= 0.9 * SIZE / 2**20
    assert np.array_equal(array, values)  # touched again: read back from the file
    del array
    mapped.close()


def test_memory_outside_a_checkpoint_is_never_dropped() -> None:
    heap = np.arange(SIZE // 8, dtype=np.int64)
    assert not drop_mapped_pages(heap.ctypes.data, heap.nbytes, checkpoint_mappings())
    assert not drop_mapped_pages(heap.ctypes.data, heap.nbytes, [])
    assert np.array_equal(heap, np.arange(SIZE // 8, dtype=np.int64))
    return_free_memory()  # harmless at any time
