"""Embeddings remembered across runs, keyed by what they depend on and nothing else.

An image vector is keyed by (model, precision, sha256 of the image bytes), a caption vector by
(model, precision, sha256 of the caption), so a pair seen in any earlier run costs no inference,
even under another URL. Each vector is its own small object: writes never contend, and a crash
loses at most the vectors of the batch in flight.

A vector object is ``MAGIC`` + the sha256 of the vector's bytes + the little-endian float32
vector, so a truncated, damaged or foreign object is caught on any store and recomputed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from sim_pipeline.core import repairs
from sim_pipeline.core.store import IntegrityError, ObjectStore

IO_THREADS = 16  # store reads and writes are I/O bound (S3 round trips): overlap them
MAGIC = b"SPV1"
HEADER = len(MAGIC) + 32


def pack(vector: np.ndarray) -> bytes:
    data = vector.astype("<f4").tobytes()
    return MAGIC + hashlib.sha256(data).digest() + data


def unpack(blob: bytes) -> np.ndarray | None:
    """The vector, or None when ``blob`` is not a whole vector written by ``pack``."""
    data = blob[HEADER:]
    if (blob[:len(MAGIC)] != MAGIC or not data or len(data) % 4
            or hashlib.sha256(data).digest() != blob[len(MAGIC):HEADER]):
        return None
    return np.frombuffer(data, dtype="<f4")


class VectorCache:
    def __init__(self, store: ObjectStore, tag: str, kind: str) -> None:
        self.store, self.prefix = store, f"embeddings/{tag}/{kind}"

    def _key(self, content_hash: str) -> str:
        return f"{self.prefix}/{content_hash[:2]}/{content_hash}.f32"

    def _read(self, content_hash: str) -> np.ndarray | None:
        key = self._key(content_hash)
        try:
            vector = unpack(self.store.read_bytes(key))
        except KeyError:
            return None
        except IntegrityError as damaged:
            vector = None
            repairs.note("cached vector", self.store.uri(key), damaged)
        else:
            if vector is None:
                repairs.note("cached vector", self.store.uri(key), "damaged or truncated")
        return vector

    def get_many(self, hashes: Iterable[str]) -> dict[str, np.ndarray]:
        """The cached vectors among ``hashes``; missing ones are simply absent."""
        hashes = list(hashes)
        with ThreadPoolExecutor(IO_THREADS) as pool:
            found = pool.map(repairs.carried(self._read), hashes)
            return {h: v for h, v in zip(hashes, found, strict=True) if v is not None}

    def put_many(self, vectors: Mapping[str, np.ndarray]) -> None:
        def write(item: tuple[str, np.ndarray]) -> None:
            self.store.write_bytes(self._key(item[0]), pack(item[1]))

        with ThreadPoolExecutor(IO_THREADS) as pool:
            list(pool.map(write, vectors.items()))
