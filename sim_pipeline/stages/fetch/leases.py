"""Fetch leases: runs that share a store share their in-flight downloads.

Before downloading a URL, a run creates the URL's lease in the store (``create_bytes``: a hard
link on disk, a conditional PUT on S3, so exactly one creator wins). A second run that meets the
lease leaves the URL for later and goes on with its others; when it comes back, the holder has
written the URL's record and released the lease, and the record is used as it would be from the
cache. Two runs started together thus make about one request per URL, as one run would.

A lease names its holder (host, process) and when it expires; the holder renews the leases it
holds while it downloads. A lease whose holder ended on this host, or that is past its expiry (a
holder on another machine that died), is taken over.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass

from sim_pipeline.core.files import HOST_TAG, process_alive
from sim_pipeline.core.layout import image_lease_key
from sim_pipeline.core.store import IntegrityError, MissingObject, ObjectStore

LEASE_SECONDS = 60.0  # a lease's life; its holder renews it every third of that


@dataclass(frozen=True)
class Lease:
    host: str  # core.files.HOST_TAG of the holder
    pid: int
    expires: float  # Unix time

    def is_stale(self, now: float) -> bool:
        """Nobody will finish it: past its expiry, or its holder on this host has ended."""
        return self.expires < now or (self.host == HOST_TAG and not process_alive(self.pid))


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


def take_lease(store: ObjectStore, url_hash: str) -> bool:
    """Hold the URL's lease; False while another live run holds it. A stale lease is replaced
    (two runs replacing the same stale lease at once may both download: harmless, the first
    stored copy wins)."""
    key = image_lease_key(url_hash)
    if store.create_bytes(key, _fresh_lease()):
        return True
    lease = read_lease(store, key)
    if lease is not None and not lease.is_stale(time.time()):
        return False
    store.delete(key)
    return store.create_bytes(key, _fresh_lease())


def _fresh_lease() -> bytes:
    return json.dumps(asdict(Lease(HOST_TAG, os.getpid(), time.time() + LEASE_SECONDS))).encode()


class HeldLeases:
    """The leases one fetch holds; thread-safe (store threads take, release and renew them).

    ``renew`` pushes back the expiry of every lease still held, so a lease outlives a slow
    download but not a dead holder by more than ``LEASE_SECONDS``. Releasing and renewing share
    a lock, so a renewal never brings back a lease just released.
    """

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._held: set[str] = set()
        self._lock = threading.Lock()

    def take(self, url_hash: str) -> bool:
        if not take_lease(self.store, url_hash):
            return False
        with self._lock:
            self._held.add(url_hash)
        return True

    def release(self, url_hash: str) -> None:
        with self._lock:
            self._held.discard(url_hash)
            self.store.delete(image_lease_key(url_hash))

    def renew(self) -> None:
        with self._lock:
            for url_hash in self._held:
                self.store.write_bytes(image_lease_key(url_hash), _fresh_lease())
