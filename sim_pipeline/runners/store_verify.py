"""``sim-pipeline store verify [--repair]``: check every object of a store the way a run reads it,
and optionally remove the damaged ones so the next run recomputes them.

Runs heal by themselves (every read is verified and a damaged object is recomputed); this walks
a whole store at once, say after a restore from backup or a copy that dropped extended
attributes, and reports what a run would have found: the chunks' rows (against the digest in
their plan), embedding sets, results (against the digest written with them), cached vectors,
image records with their bytes, the other records, fetch leases whose holder is gone, and
temporary files left by writers that were killed.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from sim_pipeline.core.layout import LEASES_PREFIX
from sim_pipeline.core.store import (
    IntegrityError,
    MissingObject,
    ObjectStore,
    read_json,
    sha256_bytes,
)
from sim_pipeline.stages.embed.sets import load_embedding_set
from sim_pipeline.stages.embed.vector_cache import unpack
from sim_pipeline.stages.fetch.leases import lease_is_stale
from sim_pipeline.stages.plan import RunPlan, bytes_table

SHOWN = 20  # damaged objects listed by name; the rest are counted
CHUNK_ROWS, EMBEDDING_SETS, RESULTS = "chunk rows", "embedding sets", "results"
VECTORS, IMAGE_RECORDS, RECORDS, LEASES = "cached vectors", "image records", "records", "leases"
Damage = tuple[str, str]  # (key, why)


@dataclass
class Verdict:
    checked: Counter[str] = field(default_factory=Counter)
    damaged: list[Damage] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)  # temporary files and leases nobody holds
    removed: int = 0

    def render(self, uri: Callable[[str], str]) -> str:
        kinds = ", ".join(f"{n:,} {kind}" for kind, n in sorted(self.checked.items()))
        lines = [f"checked   {sum(self.checked.values()):,} objects ({kinds or 'none'})",
                 f"damaged   {len(self.damaged):,}"]
        lines += [f"  {uri(key)}: {why}" for key, why in self.damaged[:SHOWN]]
        if len(self.damaged) > SHOWN:
            lines.append(f"  ... and {len(self.damaged) - SHOWN:,} more")
        lines.append(f"stray     {len(self.stray):,} (temporary files of killed writers, "
                     "leases whose holder is gone)")
        lines += [f"  {where}" for where in self.stray[:SHOWN]]
        if len(self.stray) > SHOWN:
            lines.append(f"  ... and {len(self.stray) - SHOWN:,} more")
        if self.removed:
            lines.append(f"removed   {self.removed:,} objects: the next run recomputes them")
        elif self.damaged or self.stray:
            lines.append("run `sim-pipeline store verify --repair` to remove them; the next run "
                         "recomputes them")
        return "\n".join(lines)


def _kind(key: str) -> str | None:
    """What an object is, by its key; None for parts checked with their owner (an image's
    bytes with its record, an embedding set's vectors with its JSON, a chunk's rows with its
    plan, results with their digest record)."""
    if key.startswith(f"{LEASES_PREFIX}/"):
        return LEASES
    if key.startswith("images/"):
        return IMAGE_RECORDS if key.endswith(".json") else None
    if key.startswith("embeddings/") and key.endswith(".f32"):
        return VECTORS
    if "-embeddings." in key:
        return EMBEDDING_SETS if key.endswith(".json") else None
    if "/results." in key:
        return RESULTS if key.endswith(".json") else None
    if key.endswith(".json"):
        return RECORDS
    return None


def _check(store: ObjectStore, key: str, kind: str) -> Iterator[Damage]:
    """``(key, why)`` for each damaged object found through ``key``."""
    try:
        if kind == VECTORS:
            if unpack(store.read_bytes(key)) is None:
                yield key, "damaged or truncated vector"
        elif kind == EMBEDDING_SETS:
            load_embedding_set(store, key.removesuffix(".json"))
        elif kind == RESULTS:
            yield from _check_results(store, key)
        elif kind == IMAGE_RECORDS:
            record = read_json(store, key)
            if record.get("sha256"):
                yield from _check_image(store, key.removesuffix(".json"), record["sha256"])
        else:
            read_json(store, key)
    except (IntegrityError, MissingObject, ValueError, KeyError, TypeError) as error:
        yield key, _why(error)


def _why(error: Exception) -> str:
    if isinstance(error, MissingObject):
        return "missing"
    return str(error).split(":")[0] or type(error).__name__


def _check_image(store: ObjectStore, key: str, sha: str) -> Iterator[Damage]:
    try:
        data = store.read_bytes(key)
    except MissingObject:
        yield key, "missing (its record says it was fetched)"
        return
    if sha256_bytes(data) != sha:
        yield key, "bytes differ from their record"


def _check_results(store: ObjectStore, meta_key: str) -> Iterator[Damage]:
    """A chunk's results as finalize reads them: the digest record, then the rows it vouches
    for (digest, row count, each row readable)."""
    meta = read_json(store, meta_key)
    key = f"{meta_key.removesuffix('.meta.json')}.arrow"
    try:
        data = store.read_bytes(key)
    except (IntegrityError, MissingObject) as error:
        yield key, _why(error)
        return
    if sha256_bytes(data) != meta["sha256"]:
        yield key, "its content differs from the digest written with it"
        return
    try:
        rows = bytes_table(data).num_rows
    except pa.ArrowInvalid:
        yield key, "not readable as results"
        return
    if rows != meta["rows"]:
        yield key, f"{rows} rows where {meta['rows']} were written"


def _check_plan(store: ObjectStore, manifest_key: str, verdict: Verdict) -> Iterator[Damage]:
    """Each chunk's rows against the digest its plan recorded (a truncated or edited rows file
    is caught even when its extended attribute was rewritten or lost)."""
    try:
        plan = RunPlan.from_dict(read_json(store, manifest_key))
    except (IntegrityError, MissingObject, ValueError, KeyError, TypeError):
        return  # the manifest itself is checked as a record
    for chunk in plan.chunks:
        verdict.checked[CHUNK_ROWS] += 1
        try:
            data = store.read_bytes(chunk.rows_key)
        except (IntegrityError, MissingObject) as error:
            yield chunk.rows_key, _why(error)
            continue
        if chunk.sha256 is not None and sha256_bytes(data) != chunk.sha256:
            yield chunk.rows_key, "its content differs from the digest in its plan"


def verify_store(store: ObjectStore, repair: bool = False) -> Verdict:
    """Check every object; with ``repair``, remove each damaged one (an image together with its
    record, an embedding set with its vectors, results with their digest record) and the stray
    temporaries and leases, so that a rerun recomputes what it needs."""
    verdict = Verdict()
    for key in store.list_keys():
        kind = _kind(key)
        if kind is None or kind == LEASES:
            continue
        verdict.checked[kind] += 1
        found = list(_check(store, key, kind))
        if key.endswith("/manifest.json") and not found:
            found = list(_check_plan(store, key, verdict))
        for damaged, why in found:
            verdict.damaged.append((damaged, why))
            if repair:
                verdict.removed += _remove(store, damaged)
    for where, remove in _debris(store):
        verdict.stray.append(where)
        if repair:
            remove()
            verdict.removed += 1
    return verdict


def _debris(store: ObjectStore) -> Iterator[tuple[str, Callable[[], None]]]:
    """Each stray object, where it is and how to remove it: leases whose holder is gone, then
    temporary files whose writer was killed."""
    for key in store.list_keys(LEASES_PREFIX):
        if lease_is_stale(store, key):
            yield store.uri(key), functools.partial(store.delete, key)
    for location in store.stale_temporaries():
        yield location, functools.partial(store.remove_temporary, location)


def remove_debris(store: ObjectStore) -> int:
    """Remove what killed writers left behind; a successful run ends with this, so a clean exit
    leaves no debris. Returns how many objects went."""
    removed = 0
    for _, remove in _debris(store):
        remove()
        removed += 1
    return removed


def _remove(store: ObjectStore, key: str) -> int:
    """Remove ``key`` and what it describes or is described by (a chunk's rows are described
    by their plan)."""
    if key.startswith("images/"):
        base = key.removesuffix(".json")
        keys = [base, f"{base}.json"]
    elif "-embeddings." in key:
        base = key.removesuffix(".json").removesuffix(".npy")
        keys = [f"{base}.json", f"{base}.npy"]
    elif "/results." in key:
        base = key.removesuffix(".meta.json").removesuffix(".arrow")
        keys = [f"{base}.meta.json", f"{base}.arrow"]
    elif key.endswith("/rows.arrow"):  # with its plan: the next run plans the input again
        keys = [key, f"{key.rpartition('/chunks/')[0]}/manifest.json"]
    else:
        keys = [key]
    for each in keys:
        store.delete(each)
    return len(keys)
