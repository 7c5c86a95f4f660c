"""``sim-pipeline store verify [--repair]``: check every object of a store against its recorded
digest, and optionally remove the damaged ones so the next run recomputes them.

Runs heal by themselves (every read is verified and a damaged object is recomputed); this walks
a whole store at once, say after a restore from backup or a copy that dropped extended
attributes, and reports what a run would have found.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sim_pipeline.core.store import (
    IntegrityError,
    MissingObject,
    ObjectStore,
    read_json,
    sha256_bytes,
)
from sim_pipeline.stages.embed.sets import load_embedding_set
from sim_pipeline.stages.embed.vector_cache import unpack

SHOWN = 20  # damaged objects listed by name; the rest are counted


@dataclass
class Verdict:
    checked: Counter[str] = field(default_factory=Counter)
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (key, why)
    removed: int = 0

    def render(self, uri: Callable[[str], str]) -> str:
        kinds = ", ".join(f"{n:,} {kind}" for kind, n in sorted(self.checked.items()))
        lines = [f"checked   {sum(self.checked.values()):,} objects ({kinds or 'none'})",
                 f"damaged   {len(self.damaged):,}"]
        lines += [f"  {uri(key)}: {why}" for key, why in self.damaged[:SHOWN]]
        if len(self.damaged) > SHOWN:
            lines.append(f"  ... and {len(self.damaged) - SHOWN:,} more")
        if self.removed:
            lines.append(f"removed   {self.removed:,} objects: the next run recomputes them")
        elif self.damaged:
            lines.append("run `sim-pipeline store verify --repair` to remove them; the next run "
                         "recomputes them")
        return "\n".join(lines)


def _kind(key: str) -> str | None:
    """What an object is, by its key; None for parts checked with their owner (an image's
    bytes with its record, an embedding set's vectors with its JSON)."""
    if key.startswith("images/"):
        return "image records" if key.endswith(".json") else None
    if key.startswith("embeddings/") and key.endswith(".f32"):
        return "cached vectors"
    if "-embeddings." in key:
        return "embedding sets" if key.endswith(".json") else None
    if key.endswith(".json"):
        return "records"
    return None


def _check(store: ObjectStore, key: str, kind: str) -> Iterator[tuple[str, str]]:
    """``(key, why)`` for each damaged object found through ``key``."""
    try:
        if kind == "cached vectors":
            if unpack(store.read_bytes(key)) is None:
                yield key, "damaged or truncated vector"
        elif kind == "embedding sets":
            load_embedding_set(store, key.removesuffix(".json"))
        elif kind == "image records":
            record = read_json(store, key)
            if record.get("sha256"):
                yield from _check_image(store, key.removesuffix(".json"), record["sha256"])
        else:
            read_json(store, key)
    except (IntegrityError, MissingObject, ValueError) as error:
        yield key, str(error).split(":")[0] or type(error).__name__


def _check_image(store: ObjectStore, key: str, sha: str) -> Iterator[tuple[str, str]]:
    try:
        data = store.read_bytes(key)
    except MissingObject:
        yield key, "missing (its record says it was fetched)"
        return
    if sha256_bytes(data) != sha:
        yield key, "bytes differ from their record"


def verify_store(store: ObjectStore, repair: bool = False) -> Verdict:
    """Check every object; with ``repair``, remove each damaged one (an image together with its
    record, an embedding set with its vectors), so that a rerun recomputes it."""
    verdict = Verdict()
    for key in store.list_keys():
        kind = _kind(key)
        if kind is None:
            continue
        verdict.checked[kind] += 1
        for damaged, why in _check(store, key, kind):
            verdict.damaged.append((damaged, why))
            if repair:
                verdict.removed += _remove(store, damaged)
    return verdict


def _remove(store: ObjectStore, key: str) -> int:
    """Remove ``key`` and what it describes or is described by."""
    if key.startswith("images/"):
        base = key.removesuffix(".json")
        keys = [base, f"{base}.json"]
    elif "-embeddings." in key:
        base = key.removesuffix(".json").removesuffix(".npy")
        keys = [f"{base}.json", f"{base}.npy"]
    else:
        keys = [key]
    for each in keys:
        store.delete(each)
    return len(keys)
