"""Runs that share a store share their in-flight downloads: two fetch processes started together
(or one while the other is half done) make one request per URL, on a folder store and on S3; a
lease whose holder died is taken over at once (same host) or when it expires (another host)."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
import uuid
from pathlib import Path

import pytest

from sim_pipeline.core.config import Settings
from sim_pipeline.core.files import HOST_TAG
from sim_pipeline.core.layout import LEASES_PREFIX, image_lease_key, image_meta_key, sha256_hex
from sim_pipeline.core.store import LocalStore, ObjectStore, open_store, read_json
from sim_pipeline.stages.fetch import leases, loop
from sim_pipeline.stages.fetch.download import Outcome
from sim_pipeline.stages.fetch.loop import fetch_urls
from sim_pipeline.stages.fetch.records import FetchStats, save_fetch
from tests.conftest import ImageServer, Route, make_image
from tests.seaweed import SeaweedFS

pytest_plugins = ["tests.plugin_s3"]
URLS = 120
DELAY = 0.04  # per request: one run alone takes ~URLS * DELAY / 8 = 0.6 s


def serve(server: ImageServer, prefix: str) -> dict[str, str]:
    body = make_image(seed=5)
    urls = [server.add(f"/{prefix}/{i}.jpg", Route(body=body, delay=DELAY)) for i in range(URLS)]
    return {sha256_hex(url): url for url in urls}


def fetch_in_process(urls: dict[str, str], store: str, settings: Settings, start_at: float,
                     results: multiprocessing.Queue) -> None:
    """One run's fetch, in its own process (a child of the spawn context)."""
    time.sleep(max(0.0, start_at - time.time()))
    stats = asyncio.run(fetch_urls(urls, open_store(store), settings))
    results.put(stats.to_dict())


def two_runs(urls: dict[str, str], store: str, settings: Settings, gap: float
             ) -> list[FetchStats]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start = time.time() + 3.0  # both processes imported and waiting
    runs = [context.Process(target=fetch_in_process,
                            args=(urls, store, settings, start + delay, results))
            for delay in (0.0, gap)]
    for run in runs:
        run.start()
    stats = [FetchStats.from_dict(results.get(timeout=120)) for _ in runs]
    for run in runs:
        run.join(30)
        assert run.exitcode == 0
    return stats


def requests_for(server: ImageServer, prefix: str) -> int:
    with server._lock:
        return sum(n for path, n in server.requests.items() if path.startswith(f"/{prefix}/"))


def assert_shared(server: ImageServer, prefix: str, stats: list[FetchStats], store: ObjectStore,
                  urls: dict[str, str]) -> None:
    assert requests_for(server, prefix) == URLS, "one request per URL between both runs"
    assert sum(s.attempted for s in stats) == URLS
    assert all(s.attempted + s.cached == URLS for s in stats), "each run has every URL"
    assert all(read_json(store, image_meta_key(h))["error"] is None for h in urls)
    assert list(store.list_keys(LEASES_PREFIX)) == [], "every lease given back"


@pytest.mark.parametrize("gap", [0.0, 0.3])
def test_two_runs_on_one_folder_store_download_each_url_once(
        tmp_path: Path, image_server: ImageServer, gap: float) -> None:
    prefix = f"shared-local-{gap}"
    urls = serve(image_server, prefix)
    settings = Settings(store=str(tmp_path / "store"), allow_hosts=image_server.allow_hosts,
                        fetch_concurrency=8, fetch_timeout=10.0)
    stats = two_runs(urls, settings.store, settings, gap)
    assert_shared(image_server, prefix, stats, LocalStore(settings.store), urls)


def test_two_runs_on_one_s3_store_download_each_url_once(
        s3_env: SeaweedFS, image_server: ImageServer) -> None:
    prefix = "shared-s3"
    urls = serve(image_server, prefix)
    location = f"s3://{s3_env.bucket}/shared-{uuid.uuid4().hex[:8]}"
    settings = Settings(store=location, allow_hosts=image_server.allow_hosts,
                        fetch_concurrency=8, fetch_timeout=10.0)
    stats = two_runs(urls, location, settings, 0.0)
    assert_shared(image_server, prefix, stats, open_store(location), urls)


def dead_pid() -> int:
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=time.sleep, args=(0,))
    process.start()
    process.join()
    return process.pid


@pytest.mark.parametrize("holder", ["ended-here", "expired-elsewhere"])
def test_a_lease_whose_holder_died_is_taken_over(
        tmp_path: Path, image_server: ImageServer, holder: str) -> None:
    prefix = f"dead-holder-{holder}"
    url = image_server.add(f"/{prefix}/0.jpg", Route(body=make_image(seed=6)))
    url_hash = sha256_hex(url)
    store = LocalStore(tmp_path / "store")
    lease = ({"host": HOST_TAG, "pid": dead_pid(), "expires": time.time() + 3600}
             if holder == "ended-here" else
             {"host": "0ther0st", "pid": 1, "expires": time.time() - 1})
    store.write_bytes(image_lease_key(url_hash), json.dumps(lease).encode())
    settings = Settings(store=str(store.root), allow_hosts=image_server.allow_hosts)
    started = time.monotonic()
    stats = asyncio.run(fetch_urls({url_hash: url}, store, settings))
    assert time.monotonic() - started < 5
    assert (stats.attempted, stats.ok) == (1, 1)
    assert requests_for(image_server, prefix) == 1
    assert not store.exists(image_lease_key(url_hash))


def test_a_lease_held_by_a_live_run_elsewhere_is_waited_for(
        tmp_path: Path, image_server: ImageServer) -> None:
    """The holder stores the record and gives the lease back: the waiting run uses the record
    and sends no request."""
    prefix = "live-holder"
    url = image_server.add(f"/{prefix}/0.jpg", Route(body=make_image(seed=7)))
    url_hash = sha256_hex(url)
    store = LocalStore(tmp_path / "store")
    lease = {"host": "0ther0st", "pid": 1, "expires": time.time() + 3600}
    store.write_bytes(image_lease_key(url_hash), json.dumps(lease).encode())
    settings = Settings(store=str(store.root), allow_hosts=image_server.allow_hosts)

    async def holder_finishes() -> None:
        await asyncio.sleep(1.0)
        outcome = Outcome(None, 200, "image/jpeg", make_image(seed=7), seconds=0.01)
        save_fetch(store, url_hash, url, outcome, settings.max_pixels)
        store.delete(image_lease_key(url_hash))

    async def both() -> FetchStats:
        waiting = asyncio.create_task(fetch_urls({url_hash: url}, store, settings))
        await holder_finishes()
        return await waiting

    stats = asyncio.run(both())
    assert (stats.attempted, stats.cached) == (0, 1)
    assert requests_for(image_server, prefix) == 0, "the holder's record was used"


def test_a_slow_download_keeps_its_lease_alive(
        tmp_path: Path, image_server: ImageServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The holder renews its leases while it downloads: a download slower than a lease's life
    is not taken over by a waiting run."""
    monkeypatch.setattr(leases, "LEASE_SECONDS", 0.6)
    monkeypatch.setattr(loop, "LEASE_SECONDS", 0.6)
    prefix = "slow-holder"
    url = image_server.add(f"/{prefix}/0.jpg", Route(body=make_image(seed=8), delay=1.5))
    url_hash = sha256_hex(url)
    store = LocalStore(tmp_path / "store")
    settings = Settings(store=str(store.root), allow_hosts=image_server.allow_hosts)
    seen: list[float] = []

    async def watch() -> FetchStats:
        fetching = asyncio.create_task(fetch_urls({url_hash: url}, store, settings))
        await asyncio.sleep(1.2)  # past the first expiry, before the download ends
        seen.append(json.loads(store.read_bytes(image_lease_key(url_hash)))["expires"])
        return await fetching

    started = time.time()
    stats = asyncio.run(watch())
    assert seen[0] > started + 0.6, "renewed"
    assert (stats.attempted, stats.ok) == (1, 1)
    assert not store.exists(image_lease_key(url_hash))
