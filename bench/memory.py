"""Memory stays flat as inputs grow: peak RSS of a 100,000-row run vs a 10,000-row run.

Both inputs draw on the same few hundred images and captions (so inference is small and equal),
and each run is its own process, measured whole. Goal: the large run peaks at <= 1.2x the small.

    .venv/bin/python -m bench.memory [--small 10000] [--large 100000] [--images 300]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from bench.common import fresh_folder, random_checkpoint, small_images
from bench.end_to_end import timed_process


def write_rows(path: Path, base_url: str, names: list[str], rows: int) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "url", "caption"])
        for i in range(rows):
            writer.writerow([i, f"{base_url}/{names[i % len(names)]}",
                             f"caption {i % 211} about shapes and colours"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=300)
    args = parser.parse_args()
    model = random_checkpoint("tiny")
    server, base_url, names = small_images(args.images)
    work = fresh_folder("memory")
    env = {**os.environ, "SIM_PIPELINE_MODEL": str(model),
           "SIM_PIPELINE_DATABASE_URL": f"sqlite:///{work / 'results.db'}",
           "SIM_PIPELINE_ALLOW_HOSTS": base_url.removeprefix("http://")}
    cli = str(Path(sys.executable).with_name("sim-pipeline"))
    peaks = {}
    for rows in (args.small, args.large):
        source = work / f"rows-{rows}.csv"
        write_rows(source, base_url, names, rows)
        own = {**env, "SIM_PIPELINE_STORE": str(work / f"store-{rows}")}  # same work for both
        seconds, peaks[rows] = timed_process([cli, "score", str(source), "--quiet"], own)
        print(f"{rows:>8} rows: {seconds:6.1f} s, peak RSS {peaks[rows]:6.0f} MB")
    server.shutdown()
    print(f"large / small peak RSS: {peaks[args.large] / peaks[args.small]:.2f} (goal <= 1.2)")


if __name__ == "__main__":
    main()
