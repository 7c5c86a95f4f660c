"""The data path at scale: a million rows through plan, join and the results table.

N rows over M distinct images and K distinct captions (so inference is a few seconds of it),
a tiny random-weight checkpoint (scores are meaningless: speed only), PostgreSQL, one
``sim-pipeline score`` process. Printed, not asserted: wall time, rows/s, peak RSS and the stage
breakdown (from the run's ``stage_timings``). Then the same store, warm, scores an input
``--warm-rows`` long and one ``--rows`` long (new runs: every image and caption is known): the
peak RSS ratio of the two shows whether memory stays flat.
Goal on 2 vCPUs: <= 60 s for 1M rows end to end (>= 16.7k rows/s), peak <= 1 GB, ratio ~1.

    .venv/bin/python -m bench.scale [--rows 1000000] [--images 800] [--captions 2000]
                                    [--warm-rows 10000000] [--skip-warm]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import sqlalchemy as sa

from bench.common import fresh_folder, random_checkpoint, small_images
from bench.db_upsert import database, machine
from bench.end_to_end import timed_process
from sim_pipeline.core.layout import STAGES


def cpu_flags() -> str:
    """The vector extensions numpy and the model can use on this CPU."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            flags = next(line.split(":", 1)[1].split() for line in info
                         if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "amx_tile")
    return " ".join(flag for flag in wanted if flag in flags)


def write_rows(path: Path, base_url: str, names: list[str], captions: int, rows: int) -> None:
    """``rows`` rows; one in 1,000 has no caption (a row-level error, as real inputs have)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "url", "caption"])
        for i in range(rows):
            caption = "" if i % 1000 == 999 else \
                f"caption {i * 7919 % captions} about shapes and colours"
            writer.writerow([i, f"{base_url}/{names[i * 31 % len(names)]}", caption])


def stage_seconds(database_url: str, run_id_prefix: str) -> dict[str, float]:
    """Seconds per stage of the run whose id starts with ``run_id_prefix``, summed over chunks."""
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        found = conn.execute(sa.text(
            "SELECT stage, sum(seconds) FROM stage_timings WHERE run_id LIKE :p GROUP BY stage"),
            {"p": f"{run_id_prefix}-%"}).all()
    engine.dispose()
    return dict(found)


def run(cli: list[str], env: dict[str, str], source: Path, database_url: str) -> float:
    seconds, peak = timed_process([*cli, str(source), "--quiet"], env)
    rows = sum(1 for _ in source.open("rb")) - 1
    stages = stage_seconds(database_url, source.stem)
    breakdown = ", ".join(f"{s} {stages[s]:.1f} s" for s in STAGES if s in stages)
    print(f"{source.stem:>12}: {seconds:7.1f} s, {rows / seconds:9,.0f} rows/s, "
          f"peak RSS {peak:6.0f} MB")
    print(f"{'':>12}  {breakdown}")
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--captions", type=int, default=2000)
    parser.add_argument("--warm-rows", type=int, default=10_000_000)
    parser.add_argument("--skip-warm", action="store_true")
    args = parser.parse_args()
    model = random_checkpoint("tiny")
    server, base_url, names = small_images(args.images)
    work = fresh_folder("scale")
    cli = [str(Path(sys.executable).with_name("sim-pipeline")), "score"]
    print(f"machine   {machine()}")
    print(f"cpu flags {cpu_flags()}")
    print(f"input     {args.rows:,} rows over {args.images} images, {args.captions} captions; "
          "tiny random-weight model (scores meaningless), PostgreSQL, one process")
    with database(None) as database_url:
        env = {**os.environ, "SIM_PIPELINE_MODEL": str(model),
               "SIM_PIPELINE_DATABASE_URL": database_url,
               "SIM_PIPELINE_STORE": str(work / "store"),
               "SIM_PIPELINE_ALLOW_HOSTS": base_url.removeprefix("http://")}
        source = work / "cold.csv"
        write_rows(source, base_url, names, args.captions, args.rows)
        run(cli, env, source, database_url)
        if not args.skip_warm:
            peaks = {}
            for name, rows in (("warm-small", args.rows), ("warm-large", args.warm_rows)):
                source = work / f"{name}.csv"
                write_rows(source, base_url, names, args.captions, rows)
                peaks[name] = run(cli, env, source, database_url)
                source.unlink()
                (work / f"{name}_scored.csv").unlink()
            print(f"warm peak RSS {args.warm_rows:,} / {args.rows:,} rows: "
                  f"{peaks['warm-large'] / peaks['warm-small']:.2f}")
    server.shutdown()


if __name__ == "__main__":
    main()
