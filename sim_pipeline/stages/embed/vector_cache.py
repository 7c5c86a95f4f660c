"""Embeddings remembered across runs, keyed by what they depend on and nothing else.

An image vector is keyed by (model, precision, sha256 of the image bytes), a caption vector by
(model, precision, sha256 of the caption), so a pair seen in any earlier run costs no inference,
even under another URL. Each vector is its own small object: writes never contend, and a crash
loses at most the vectors of the batch in flight.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from sim_pipeline.core.store import ObjectStore

IO_THREADS = 16  # store reads and writes are I/O bound (S3 round trips): overlap them


class VectorCache:
    def __init__(self, store: ObjectStore, tag: str, kind: str) -> None:
        self.store, self.prefix = store, f"embeddings/{tag}/{kind}"

    def _key(self, content_hash: str) -> str:
        return f"{self.prefix}/{content_hash[:2]}/{content_hash}.f32"

    def _read(self, content_hash: str) -> np.ndarray | None:
        try:
            return np.frombuffer(self.store.read_bytes(self._key(content_hash)), dtype="<f4")
        except KeyError:
            return None

    def get_many(self, hashes: Iterable[str]) -> dict[str, np.ndarray]:
        """The cached vectors among ``hashes``; missing ones are simply absent."""
        hashes = list(hashes)
        with ThreadPoolExecutor(IO_THREADS) as pool:
            found = pool.map(self._read, hashes)
            return {h: v for h, v in zip(hashes, found, strict=True) if v is not None}

    def put_many(self, vectors: Mapping[str, np.ndarray]) -> None:
        def write(item: tuple[str, np.ndarray]) -> None:
            self.store.write_bytes(self._key(item[0]), item[1].astype("<f4").tobytes())

        with ThreadPoolExecutor(IO_THREADS) as pool:
            list(pool.map(write, vectors.items()))
