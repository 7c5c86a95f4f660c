"""Embedding sets: what embed-images and embed-texts write per chunk and join-score reads.

A set is ``<key>.npy`` (float32 vectors, one row per key) and ``<key>.json`` (the keys, per-key
error codes, the model). The JSON is written last and marks the set complete, so a crash
mid-stage leaves nothing a rerun would trust.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sim_pipeline.core import repairs
from sim_pipeline.core.store import (
    REPAIR_ADVICE,
    IntegrityError,
    ObjectStore,
    read_json,
    sha256_bytes,
    write_json,
)
from sim_pipeline.stages.plan import InputRow


@dataclass(frozen=True)
class EmbeddingSet:
    """Vectors by key (url hash or caption hash); failed keys have an error instead."""

    keys: list[str]
    vectors: np.ndarray
    errors: dict[str, str]

    def lookup(self) -> dict[str, int]:
        return {key: i for i, key in enumerate(self.keys)}


@dataclass(frozen=True)
class EmbedStats:
    computed: int = 0
    from_cache: int = 0
    failed: int = 0
    chunk_done_before: bool = False


def save_embedding_set(store: ObjectStore, key: str, result: EmbeddingSet, model: str) -> None:
    """The vectors first, then the JSON that names them and carries their digest: the JSON's
    presence means the set is whole."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(result.vectors, dtype=np.float32), allow_pickle=False)
    data = buffer.getvalue()
    store.write_bytes(f"{key}.npy", data)
    write_json(store, f"{key}.json", {"keys": result.keys, "errors": result.errors,
                                      "model": model, "npy_sha256": sha256_bytes(data)})


def load_embedding_set(store: ObjectStore, key: str) -> EmbeddingSet:
    """The set, verified: ``IntegrityError`` if either part is damaged, ``KeyError`` if missing."""
    meta = read_json(store, f"{key}.json")
    data = store.read_bytes(f"{key}.npy")
    digest = sha256_bytes(data)
    if meta.get("npy_sha256", digest) != digest:
        raise IntegrityError(f"{store.uri(key + '.npy')} is damaged: {REPAIR_ADVICE}.")
    vectors = np.load(io.BytesIO(data), allow_pickle=False)
    if vectors.shape[0] != len(meta["keys"]):
        raise IntegrityError(f"{store.uri(key + '.npy')} does not match its keys: "
                             f"{REPAIR_ADVICE}.")
    return EmbeddingSet(meta["keys"], vectors, meta["errors"])


def set_is_whole(store: ObjectStore, key: str, kind: str) -> bool:
    """Whether the stage's set exists and is intact; a damaged one is noted for recomputing."""
    if not store.exists(f"{key}.json"):
        return False
    try:
        load_embedding_set(store, key)
    except (IntegrityError, KeyError, ValueError) as damaged:
        repairs.note(kind, store.uri(key), damaged)
        return False
    return True


def assemble(keys: list[str], vectors: dict[str, np.ndarray], errors: dict[str, str],
             content: Callable[[str], str] = lambda key: key) -> EmbeddingSet:
    """Stack the vectors of ``keys`` (looked up by their content hash) into one set."""
    dim = len(next(iter(vectors.values()))) if vectors else 0
    matrix = np.zeros((len(keys), dim), dtype=np.float32)
    for i, key in enumerate(keys):
        if key not in errors:
            matrix[i] = vectors[content(key)]
    return EmbeddingSet(keys, matrix, errors)


def scorable(rows: list[InputRow]) -> list[InputRow]:
    """Rows that reach the model: those without an input error."""
    return [r for r in rows if r.error is None]
