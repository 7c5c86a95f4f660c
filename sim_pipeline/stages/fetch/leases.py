"""Fetch leases: runs that share a store share their in-flight downloads.

Before downloading a URL, a run creates the URL's lease in the store (``create_bytes``: a hard
link on disk, a conditional PUT on S3, so exactly one creator wins). A second run that meets the
lease leaves the URL for later and goes on with its others; when it comes back, the holder has
written the URL's record and released the lease, and the record is used as it would be from the
cache. Two runs started together thus make about one request per URL, as one run would.

A lease names its holder (host, process) and when it expires: a lease whose holder ended on this
host, or that is past its expiry (a holder on another machine that died), is taken over.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass

from sim_pipeline.core.config import Settings
from sim_pipeline.core.files import HOST_TAG, process_alive
from sim_pipeline.core.layout import image_lease_key
from sim_pipeline.core.store import IntegrityError, MissingObject, ObjectStore
from sim_pipeline.stages.fetch.download import MAX_RETRY_AFTER

SAVE_SLACK_SECONDS = 60.0  # storing the bytes and the record after the last byte arrived


@dataclass(frozen=True)
class Lease:
    host: str  # core.files.HOST_TAG of the holder
    pid: int
    expires: float  # Unix time

    def is_stale(self, now: float) -> bool:
        """Nobody will finish it: past its expiry, or its holder on this host has ended."""
        return self.expires < now or (self.host == HOST_TAG and not process_alive(self.pid))


def lease_seconds(settings: Settings) -> float:
    """How long one URL may keep its lease: every attempt to its deadline with the longest
    Retry-After honoured between them, times the turns it may wait for a per-host slot."""
    per_url = (settings.fetch_retries + 1) * (settings.fetch_timeout + MAX_RETRY_AFTER)
    turns = max(1, math.ceil(settings.fetch_concurrency / max(1, settings.fetch_per_host)))
    return per_url * turns + SAVE_SLACK_SECONDS


def read_lease(store: ObjectStore, key: str) -> Lease | None:
    """The lease at ``key``; None when there is none. A damaged one reads as long expired."""
    try:
        data = json.loads(store.read_bytes(key))
        return Lease(str(data["host"]), int(data["pid"]), float(data["expires"]))
    except MissingObject:
        return None
    except (IntegrityError, ValueError, KeyError, TypeError):
        return Lease("", 0, 0.0)


def lease_is_stale(store: ObjectStore, key: str) -> bool:
    lease = read_lease(store, key)
    return lease is not None and lease.is_stale(time.time())


def take_lease(store: ObjectStore, url_hash: str, seconds: float) -> bool:
    """Hold the URL's lease; False while another live run holds it. A stale lease is replaced
    (two runs replacing the same stale lease at once may both download: harmless, the first
    stored copy wins)."""
    key = image_lease_key(url_hash)
    body = json.dumps(asdict(Lease(HOST_TAG, os.getpid(), time.time() + seconds))).encode()
    if store.create_bytes(key, body):
        return True
    lease = read_lease(store, key)
    if lease is not None and not lease.is_stale(time.time()):
        return False
    store.delete(key)
    return store.create_bytes(key, body)


def release_lease(store: ObjectStore, url_hash: str) -> None:
    store.delete(image_lease_key(url_hash))
