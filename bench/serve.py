"""Online scoring under concurrent clients: micro-batching on vs batch size 1, side by side.

N clients (32 by default) each send one pair per request, ``--rounds`` requests in a row, to a
``sim-pipeline serve`` process on loopback. The image cache is warm (every image was fetched into
the store beforehand) and the vector cache cold (each mode gets its own copy of the fetched
images), so every pair costs a decode and a forward pass of each tower: what is measured is
serving and inference, not downloads. Prints pairs/s, p50/p95/p99 latency and the mean batch the
image tower saw, for batching on (``--max-batch-size``, ``--max-wait-ms``) and off (batch size 1).
Goal: at least 4x the pairs/s with batching on a CPU. Random ViT-B/32 weights: speed only, the
scores are meaningless.

    .venv/bin/python -m bench.serve [--clients 32] [--rounds 4] [--max-batch-size 32]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.common import (
    BENCH_DIR,
    serve_folder,
    start_serve,
    vit_b32_checkpoint,
    write_images,
)
from sim_pipeline.core.config import Settings
from sim_pipeline.runners.pipeline import fetch_csv


@dataclass(frozen=True)
class Figures:
    mode: str
    pairs: int
    seconds: float
    latencies: list[float]
    mean_batch: float

    def row(self) -> str:
        p50, p95, p99 = (np.percentile(self.latencies, q) * 1000 for q in (50, 95, 99))
        return (f"{self.mode:<26}{self.pairs:>6}{self.pairs / self.seconds:>9.1f}{p50:>9.0f}"
                f"{p95:>9.0f}{p99:>9.0f}{self.mean_batch:>12.1f}")


def start_server(model: Path, store: Path, allow_hosts: str, batch: int,
                 wait_ms: float) -> tuple[subprocess.Popen[bytes], str]:
    return start_serve(store.parent, model, f"sqlite:///{store.parent / 'results.db'}",
                       allow_hosts, "--max-batch-size", str(batch), "--max-wait-ms", str(wait_ms))


async def clients(base: str, pairs: list[list[tuple[str, str]]]) -> tuple[float, list[float]]:
    """Each client sends its pairs one request at a time; returns wall seconds and latencies."""
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=len(pairs))
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:

        async def one_client(mine: list[tuple[str, str]]) -> None:
            for url, caption in mine:
                started = time.perf_counter()
                answer = await http.post("/v1/score", json={"pairs": [
                    {"url": url, "caption": caption}]})
                answer.raise_for_status()
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(one_client(mine) for mine in pairs))
    return time.perf_counter() - started, latencies


def mean_image_batch(base: str) -> float:
    samples = {s.name: s.value for family in text_string_to_metric_families(
        httpx.get(f"{base}/metrics").text) for s in family.samples
        if s.labels.get("tower") == "image"}
    return samples["sim_serve_batch_size_sum"] / max(1.0, samples["sim_serve_batch_size_count"])


def measure(mode: str, batch: int, wait_ms: float, model: Path, warm: Path, allow_hosts: str,
            work: list[list[tuple[str, str]]], warm_up: tuple[str, str]) -> Figures:
    folder = BENCH_DIR / "serve-run" / ("batch-1" if batch == 1 else "batching")
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(warm / "images", folder / "store" / "images")  # bytes warm, vectors cold
    process, base = start_server(model, folder / "store", allow_hosts, batch, wait_ms)
    try:
        httpx.post(f"{base}/v1/score", timeout=600, json={"pairs": [
            {"url": warm_up[0], "caption": warm_up[1]}]}).raise_for_status()
        seconds, latencies = asyncio.run(clients(base, work))
        return Figures(mode, len(latencies), seconds, latencies, mean_image_batch(base))
    finally:
        process.terminate()
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="requests per client")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    args = parser.parse_args()

    model = vit_b32_checkpoint()
    count = args.clients * args.rounds + 1
    names = write_images(BENCH_DIR / "serve-images", count)
    image_server, base_url = serve_folder(BENCH_DIR / "serve-images")
    allow_hosts = base_url.removeprefix("http://")
    pairs = [(f"{base_url}/{name}", f"a photo of scene number {i} with colourful shapes")
             for i, name in enumerate(names)]
    warm = BENCH_DIR / "serve-warm-store"
    source = BENCH_DIR / "serve-pairs.csv"
    with source.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("url", "caption"), *pairs])
    fetch_csv(source, Settings(model=str(model), store=str(warm), allow_hosts=allow_hosts,
                               database_url=f"sqlite:///{BENCH_DIR / 'serve-fetch.db'}"),
              progress=False)
    work = [pairs[c * args.rounds:(c + 1) * args.rounds] for c in range(args.clients)]

    modes = [(f"batching on ({args.max_batch_size}, {args.max_wait_ms:g} ms)",
              args.max_batch_size, args.max_wait_ms), ("batch size 1", 1, 0.0)]
    figures = [measure(mode, batch, wait, model, warm, allow_hosts, work, pairs[-1])
               for mode, batch, wait in modes]
    image_server.shutdown()

    print(f"serve: {args.clients} concurrent clients x {args.rounds} requests of one pair, "
          f"warm image cache, cold vector cache, {model.name} (random weights: speed only), "
          f"{os.cpu_count()} CPU cores")
    print(f"{'mode':<26}{'pairs':>6}{'pairs/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
          f"{'mean batch':>12}")
    for figure in figures:
        print(figure.row())
    on, off = figures
    print(f"batching on / off pairs/s: {on.pairs / on.seconds / (off.pairs / off.seconds):.1f}x")


if __name__ == "__main__":
    main()
