"""What the fetch stage learns about each URL (``FetchRecord``) and counts (``FetchStats``).

A record is stored as JSON beside the image bytes, and written last, so its presence means "done".
It carries the time the URL took, so a run's report can show its slowest hosts.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sim_pipeline.core import errors, repairs
from sim_pipeline.core.layout import image_key, image_meta_key
from sim_pipeline.core.store import (
    IntegrityError,
    MissingObject,
    ObjectStore,
    read_json,
    sha256_bytes,
    write_json,
)
from sim_pipeline.stages.decode import DecodeFailed, inspect_image
from sim_pipeline.stages.fetch.download import Outcome

_BUCKET_RATIO = 1.1  # latency histogram: each bucket 10% wider than the last


@dataclass(frozen=True)
class FetchRecord:
    """What we learned about one URL; stored as JSON next to the bytes."""

    url: str
    error: str | None = None
    status: int | None = None
    content_type: str | None = None
    size: int = 0
    sha256: str | None = None
    format: str | None = None
    width: int | None = None
    height: int | None = None
    seconds: float | None = None  # first request to final answer, retries included


@dataclass
class FetchStats:
    """Counts for one chunk or a whole run; ``latency`` is a mergeable log-bucket histogram."""

    attempted: int = 0
    ok: int = 0
    cached: int = 0
    bytes: int = 0
    retries: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latency: Counter[int] = field(default_factory=Counter)

    def count(self, record: FetchRecord, outcome: Outcome) -> None:
        self.attempted += 1
        self.bytes += record.size
        self.retries += outcome.retries
        self.latency[math.ceil(math.log(max(outcome.seconds, 1e-4) * 1000, _BUCKET_RATIO))] += 1
        if record.error:
            self.errors[record.error] += 1
        else:
            self.ok += 1

    def add(self, other: FetchStats) -> None:
        self.attempted += other.attempted
        self.ok += other.ok
        self.cached += other.cached
        self.bytes += other.bytes
        self.retries += other.retries
        self.errors.update(other.errors)
        self.latency.update(other.latency)

    def latency_seconds(self, quantile: float) -> float | None:
        """Per-URL latency (first request to final answer, retries included), within 5%."""
        total = sum(self.latency.values())
        seen = 0
        for bucket in sorted(self.latency):
            seen += self.latency[bucket]
            if seen >= quantile * total:
                return round(_BUCKET_RATIO ** (bucket - 0.5) / 1000, 4)
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"attempted": self.attempted, "ok": self.ok, "cached": self.cached,
                "bytes": self.bytes, "retries": self.retries,
                "errors": dict(sorted(self.errors.items())),
                "latency_p50_s": self.latency_seconds(0.5),
                "latency_p95_s": self.latency_seconds(0.95),
                "latency_buckets": {str(k): v for k, v in sorted(self.latency.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FetchStats:
        return cls(data["attempted"], data["ok"], data["cached"], data["bytes"],
                   data.get("retries", 0), Counter(data["errors"]),
                   Counter({int(k): v for k, v in data.get("latency_buckets", {}).items()}))


def cached_record(store: ObjectStore, url_hash: str, refetch_errors: bool = False
                  ) -> dict[str, Any] | None:
    """The stored record of the URL, read once; ``None`` when it must be fetched: no record, a
    damaged one (noted, then fetched again), or a failure worth retrying."""
    try:
        record: dict[str, Any] = read_json(store, image_meta_key(url_hash))
    except MissingObject:
        return None
    except IntegrityError as damaged:
        repairs.note("image record", store.uri(image_meta_key(url_hash)), damaged)
        return None
    return record if _usable(record, refetch_errors) else None


def _usable(record: dict[str, Any], refetch_errors: bool) -> bool:
    """Not a failure worth retrying."""
    error = record.get("error")
    return not (errors.retry_next_run(error) or (refetch_errors and error is not None))


def fetched_meanwhile(store: ObjectStore, url_hash: str, refetch_errors: bool = False) -> bool:
    """Whether a usable record is there now, after ``cached_record`` found none: another run
    stored it since. Read quietly: a damaged record was noted when this run first looked."""
    try:
        return _usable(read_json(store, image_meta_key(url_hash)), refetch_errors)
    except (MissingObject, IntegrityError):
        return False


def needs_fetch(store: ObjectStore, url_hash: str, refetch_errors: bool = False) -> bool:
    """No record, a damaged one (noted, then fetched again), or a failure worth retrying."""
    return cached_record(store, url_hash, refetch_errors) is None


def describe(url: str, outcome: Outcome, max_pixels: int) -> FetchRecord:
    """The record for a download; an image is checked from its header (format, pixel count)."""
    record = FetchRecord(url, outcome.error, outcome.status, outcome.content_type,
                         seconds=round(outcome.seconds, 4))
    if outcome.error:
        return record
    try:
        info = inspect_image(outcome.data, max_pixels)
    except DecodeFailed as failure:
        return replace(record, error=failure.code, size=len(outcome.data))
    return replace(record, size=len(outcome.data), sha256=sha256_bytes(outcome.data),
                   format=info.format, width=info.width, height=info.height)


def save_fetch(store: ObjectStore, url_hash: str, url: str, outcome: Outcome,
               max_pixels: int) -> FetchRecord:
    """Store the bytes (first writer wins) and then the record describing the stored bytes."""
    record = describe(url, outcome, max_pixels)
    if record.error is None and not store.create_bytes(image_key(url_hash), outcome.data,
                                                       record.sha256):
        stored = store.read_bytes(image_key(url_hash))
        record = describe(url, replace(outcome, data=stored), max_pixels)
    write_json(store, image_meta_key(url_hash), asdict(record))
    return record
