"""The service under load: latency and pairs/s by concurrency, overload, and SIGTERM under load.

Three parts, each against a ``sim-pipeline serve`` process on loopback (random ViT-B/32 weights:
speed only, the scores are meaningless):

1. **Concurrency.** 1, 8, 32 and 128 users, each sending one pair per request, back to back, for
   ``--seconds``; then the requests still in flight finish. *Cached* pairs were all scored once
   before (image bytes, image and text vectors in the store: no download, no inference);
   *uncached* pairs are new every request (a new image from the local image server, a new
   caption: a download, a decode and both towers). Prints requests, pairs/s and p50/p95/p99.
2. **Overload.** ``--overload-users`` users against ``--max-queue`` far below them, every request
   with ``"record": true``: each refusal must be 503 with ``Retry-After``, each accepted request
   its answer, and the results table must hold exactly the accepted pairs (none lost, none twice).
3. **SIGTERM during load.** The same load; SIGTERM after a few seconds. Every request sent before
   it must be answered; later ones are refused at connect; the service exits 0 once drained.

Users are asyncio tasks on one httpx client (a new connection per request, so a refused
connection is told apart from a dropped request), not locust: parts 2 and 3 need each request's
fate matched against the results table and the signal's moment, which locust's statistics do not
keep. Printed, not asserted; a check that fails prints FAILED.

    .venv/bin/python -m bench.serve_load [--users 1,8,32,128] [--seconds 20]
                                         [--parts concurrency,overload,sigterm]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from pathlib import Path

import httpx
import numpy as np
import sqlalchemy as sa

from bench.common import fresh_folder, jpeg_bytes, start_serve, vit_b32_checkpoint
from sim_pipeline.devtools.local_http import QueueingHTTPServer

IMAGE_SIZE = (320, 240)
CACHED_PAIRS = 64
PARTS = ("concurrency", "overload", "sigterm")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
Pair = tuple[str, str]


# -- the pieces: images, the service, the users ---------------------------------------------


@lru_cache(maxsize=4096)
def image(seed: int) -> bytes:
    return jpeg_bytes(seed, IMAGE_SIZE)


class ImageHandler(BaseHTTPRequestHandler):
    """``/img/<n>.jpg``: a distinct JPEG per ``n``, made on first request."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        name = self.path.rsplit("/", 1)[-1].removesuffix(".jpg")
        if not name.isdigit():
            self.send_error(404)
            return
        body = image(int(name))
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def image_server() -> tuple[ThreadingHTTPServer, str]:
    server = QueueingHTTPServer(("127.0.0.1", 0), ImageHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"127.0.0.1:{server.server_address[1]}"


class Pairs:
    """Cached pairs (a fixed set, scored once beforehand) or new ones, each a fresh image and
    caption."""

    def __init__(self, host: str) -> None:
        self.host, self.seeds = host, count(10_000)

    def pair(self, seed: int) -> Pair:
        return (f"http://{self.host}/img/{seed}.jpg",
                f"a photo of scene number {seed} with some colourful shapes")

    def cached(self) -> list[Pair]:
        return [self.pair(seed) for seed in range(CACHED_PAIRS)]

    def new(self) -> Pair:
        return self.pair(next(self.seeds))


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    base: str
    database_url: str


def start_service(folder: Path, model: Path, allow_hosts: str, *extra: str) -> Service:
    database_url = f"sqlite:///{folder / 'results.db'}"
    process, base = start_serve(folder, model, database_url, allow_hosts, *extra)
    return Service(process, base, database_url)


@dataclass
class Outcome:
    """One request: when it started and ended, and what came back."""

    caption: str
    started: float
    ended: float
    status: int | None = None  # None: no HTTP answer
    failure: str = ""  # the transport error, when there was no answer
    retry_after: str | None = None
    answered_pairs: int = 0


@dataclass
class Load:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 200]

    def row(self, label: str) -> str:
        ok = self.ok()
        latencies = [o.ended - o.started for o in ok] or [float("nan")]
        p50, p95, p99 = (np.percentile(latencies, q) * 1000 for q in (50, 95, 99))
        refused = sum(o.status == 503 for o in self.outcomes)
        return (f"{label:<20}{len(ok):>9}{len(ok) / self.seconds:>9.1f}{p50:>9.0f}{p95:>9.0f}"
                f"{p99:>9.0f}{refused:>6}")


async def run_users(base: str, users: int, seconds: float, next_pair: Callable[[], Pair],
                    record: bool = False, stop_sending: asyncio.Event | None = None) -> Load:
    """``users`` users, each sending one pair per request back to back until ``seconds`` pass
    (or ``stop_sending``, or its connection is refused); the last requests then finish."""
    load = Load()
    stop = stop_sending or asyncio.Event()
    limits = httpx.Limits(max_connections=users, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:

        async def user() -> None:
            while not stop.is_set():
                url, caption = next_pair()
                outcome = Outcome(caption, time.perf_counter(), 0.0)
                load.outcomes.append(outcome)
                try:
                    answer = await http.post("/v1/score", json={
                        "pairs": [{"url": url, "caption": caption}], "record": record})
                except httpx.TransportError as error:
                    outcome.ended, outcome.failure = time.perf_counter(), type(error).__name__
                    return  # the service is gone or going: this user stops
                outcome.ended, outcome.status = time.perf_counter(), answer.status_code
                outcome.retry_after = answer.headers.get("retry-after")
                if answer.status_code == 200:
                    results = answer.json()["results"]
                    outcome.answered_pairs = sum(r["similarity"] is not None for r in results)
                elif outcome.retry_after is not None:  # as a well-behaved client would
                    await asyncio.sleep(float(outcome.retry_after))

        started = time.perf_counter()
        timer = asyncio.get_running_loop().call_later(seconds, stop.set)
        await asyncio.gather(*(user() for _ in range(users)))
        timer.cancel()
        load.seconds = time.perf_counter() - started
    return load


def recorded_captions(database_url: str) -> list[str]:
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT caption FROM similarity_scores WHERE run_id = :r"),
                            {"r": f"serve-{datetime.now(UTC):%Y%m%d}"}).scalars().all()
    engine.dispose()
    return list(rows)


def check(ok: bool) -> str:
    return "ok" if ok else "FAILED"


# -- the three parts ------------------------------------------------------------------------


def concurrency(model: Path, host: str, pairs: Pairs, levels: list[int], seconds: float,
                batch: int) -> Iterator[str]:
    folder = fresh_folder("serve-load/concurrency")
    service = start_service(folder, model, host, "--max-batch-size", str(batch),
                            "--max-queue", "4096")
    try:
        cached = pairs.cached()
        for i in range(0, len(cached), 16):  # warm every cache: bytes, image and text vectors
            httpx.post(f"{service.base}/v1/score", timeout=600, json={"pairs": [
                {"url": u, "caption": c} for u, c in cached[i:i + 16]]}).raise_for_status()
        yield (f"{'pairs':<20}{'requests':>9}{'pairs/s':>9}{'p50 ms':>9}{'p95 ms':>9}"
               f"{'p99 ms':>9}{'503':>6}")
        picks = count()
        for users in levels:
            load = asyncio.run(run_users(service.base, users, seconds,
                                         lambda: cached[next(picks) % len(cached)]))
            yield load.row(f"cached, {users} users")
        for users in levels:
            load = asyncio.run(run_users(service.base, users, seconds, pairs.new))
            yield load.row(f"uncached, {users} users")
    finally:
        service.process.terminate()
        service.process.wait(timeout=120)


def overload(model: Path, host: str, pairs: Pairs, users: int, max_queue: int, seconds: float,
             batch: int) -> Iterator[str]:
    folder = fresh_folder("serve-load/overload")
    service = start_service(folder, model, host, "--max-batch-size", str(batch),
                            "--max-queue", str(max_queue), "--max-items", "1")
    try:
        load = asyncio.run(run_users(service.base, users, seconds, pairs.new, record=True))
    finally:
        service.process.terminate()
        service.process.wait(timeout=120)
    ok, refused = load.ok(), [o for o in load.outcomes if o.status == 503]
    other = [o for o in load.outcomes if o.status not in (200, 503)]
    recorded = recorded_captions(service.database_url)
    accepted = sorted(o.caption for o in ok)
    yield (f"overload: {users} users, --max-queue {max_queue}, one pair per request, "
           f"record: true, {load.seconds:.0f} s")
    yield (f"  requests {len(load.outcomes)}: answered {len(ok)}, refused 503 {len(refused)}, "
           f"other {len(other)} {sorted({o.status or o.failure for o in other})}")
    yield (f"  every 503 has Retry-After: "
           f"{check(all(o.retry_after is not None for o in refused))} "
           f"(Retry-After: {sorted({o.retry_after for o in refused})})")
    yield (f"  every accepted request has its answer: "
           f"{check(all(o.answered_pairs == 1 for o in ok))}")
    yield (f"  results table: {len(recorded)} rows for {len(accepted)} accepted pairs, "
           f"{len(recorded) - len(set(recorded))} duplicated, "
           f"{len(set(accepted) - set(recorded))} lost, "
           f"{len(set(recorded) - set(accepted))} not accepted: "
           f"{check(sorted(recorded) == accepted and not other)}")


def sigterm(model: Path, host: str, pairs: Pairs, users: int, after: float,
            batch: int) -> Iterator[str]:
    folder = fresh_folder("serve-load/sigterm")
    service = start_service(folder, model, host, "--max-batch-size", str(batch),
                            "--max-queue", "4096", "--drain-seconds", "120")
    sent_at: list[float] = []

    async def load_then_signal() -> Load:
        async def signal_later() -> None:
            await asyncio.sleep(after)
            sent_at.append(time.perf_counter())
            service.process.send_signal(signal.SIGTERM)

        signaller = asyncio.ensure_future(signal_later())
        load = await run_users(service.base, users, 3600, pairs.new, record=True)
        await signaller
        return load

    load = asyncio.run(load_then_signal())
    status = service.process.wait(timeout=300)
    drained = time.perf_counter() - sent_at[0]
    before = [o for o in load.outcomes if o.started < sent_at[0]]
    in_flight = [o for o in before if o.ended > sent_at[0]]
    after_signal = [o for o in load.outcomes if o.started >= sent_at[0]]
    recorded = recorded_captions(service.database_url)
    answered = sorted(o.caption for o in load.ok())
    yield (f"SIGTERM after {after:g} s of load from {users} users, one pair per request, "
           "record: true")
    yield (f"  sent before SIGTERM {len(before)}: answered {sum(o.status == 200 for o in before)}"
           f" (in flight at SIGTERM {len(in_flight)}, answered "
           f"{sum(o.status == 200 for o in in_flight)}): "
           f"{check(all(o.status == 200 for o in before))}")
    yield (f"  sent after SIGTERM {len(after_signal)}: answered "
           f"{sum(o.status == 200 for o in after_signal)}, refused "
           f"{sorted({o.failure or str(o.status) for o in after_signal if o.status != 200})}")
    yield (f"  results table: {len(recorded)} rows for {len(answered)} answered pairs: "
           f"{check(sorted(recorded) == answered)}; exit status {status} {check(status == 0)} "
           f"{drained:.1f} s after SIGTERM")


def machine() -> str:
    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
        present = set(next(line for line in info if line.startswith("flags")).split())
        flags = " ".join(f for f in CPU_FLAGS if f in present)
    except (OSError, StopIteration):
        pass
    return (f"CPU: {cpu}, {os.cpu_count()} cores, flags: {flags or 'none of ' + str(CPU_FLAGS)},"
            f" load average {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", default="1,8,32,128", help="concurrency levels")
    parser.add_argument("--seconds", type=float, default=20.0, help="sending time per level")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--overload-users", type=int, default=64)
    parser.add_argument("--max-queue", type=int, default=8, help="the overload run's")
    parser.add_argument("--sigterm-after", type=float, default=8.0)
    parser.add_argument("--parts", default=",".join(PARTS), help="which parts to run")
    args = parser.parse_args()

    model = vit_b32_checkpoint()
    server, host = image_server()
    pairs = Pairs(host)
    print(f"serve under load: {model.name} (random weights: speed only), "
          f"--max-batch-size {args.max_batch_size}, {args.seconds:g} s per level")
    print(machine())
    levels = [int(u) for u in args.users.split(",")]
    parts = {
        "concurrency": lambda: concurrency(model, host, pairs, levels, args.seconds,
                                           args.max_batch_size),
        "overload": lambda: overload(model, host, pairs, args.overload_users, args.max_queue,
                                     args.seconds, args.max_batch_size),
        "sigterm": lambda: sigterm(model, host, pairs, args.overload_users // 2,
                                   args.sigterm_after, args.max_batch_size)}
    for name in args.parts.split(","):
        for line in parts[name]():
            print(line, flush=True)
    server.shutdown()


if __name__ == "__main__":
    main()
