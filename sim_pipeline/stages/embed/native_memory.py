"""Keeping a long run's resident memory near what it really uses: glibc malloc tuning, and
dropping the pages of a memory-mapped checkpoint once its tensors have been copied.

Every call does nothing where the C library is not glibc or /proc is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
from pathlib import Path

M_ARENA_MAX = -8
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's own ceiling for its moving threshold (64-bit)
MADV_DONTNEED = 4


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim, libc.madvise  # noqa: B018 - all must exist
    except (OSError, AttributeError):
        return None
    return libc


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread its own heap arena; decode and I/O threads would fragment memory
    into many. A couple of arenas keeps peak RSS down at no measurable cost in speed.

    A fixed mmap threshold of 32 MB, glibc's own ceiling for its moving one: the model's
    activations (a few MB to ~20 MB a layer) stay in the heap and are reused, where a lower
    threshold (4 MB, before) mapped and unmapped them on every layer, page-faulting their memory
    in anew: the bare image tower took 20.4 s instead of 14.5 s over 800 images (bf16), the
    embed-images stage 22.1 s instead of 18.0 s. Fixed, it does not move up after a large free.
    Decoded photos (Pillow keeps pixels in blocks of up to 16 MB) come from the heap too and are
    reused image after image: six photos near the pixel cap still peak where one does (tested).
    """
    if libc := _glibc():
        libc.mallopt(M_ARENA_MAX, arenas)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def return_free_memory() -> None:
    """Hand freed heap pages back to the OS (a freed model tower stays resident otherwise, and
    the next stage's peak would sit on top of it)."""
    if libc := _glibc():
        with contextlib.suppress(OSError):
            libc.malloc_trim(0)


def checkpoint_mappings(maps: Path = Path("/proc/self/maps")) -> list[tuple[int, int]]:
    """Address ranges where safetensors files are memory-mapped (private, copy-on-write)."""
    ranges = []
    with contextlib.suppress(OSError), maps.open(encoding="utf-8") as lines:
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n").endswith(".safetensors"):
                start, end = (int(value, 16) for value in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def drop_mapped_pages(address: int, length: int, ranges: list[tuple[int, int]]) -> bool:
    """Unload the whole pages of ``[address, address + length)`` if they lie in a checkpoint
    mapping (``ranges``). Call it only once the tensor there has been copied: the pages are the
    file's, so if anything touches them again the kernel reads them back from the file, and no
    other tensor of the checkpoint shares a whole page inside the range."""
    libc = _glibc()
    first = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (address + length) // mmap.PAGESIZE * mmap.PAGESIZE
    if libc is None or last <= first or not any(s <= first and last <= e for s, e in ranges):
        return False
    return libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED) == 0
