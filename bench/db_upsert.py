"""How fast join-score's chunk upserts go into PostgreSQL, in rows per second.

    .venv/bin/python bench/db_upsert.py                      # throwaway database on 127.0.0.1
    .venv/bin/python bench/db_upsert.py --rows 500000 --chunk 10000 --method both
    .venv/bin/python bench/db_upsert.py --database-url postgresql://user@host/db

Rows look like a real run's (URL, caption, hashes, model, score or error, the input's fields) and
go through ``ResultsDB.upsert_scores`` exactly as join-score calls it: one transaction per chunk.
Two passes per method: ``insert`` (new rows) and ``re-upsert`` (the same rows again, so every row
hits ON CONFLICT DO UPDATE, as a retried run does). Building the rows is not timed. Without
``--database-url`` it creates a database on the local PostgreSQL and drops it afterwards; with
one, it writes runs named ``bench-...`` there and deletes them afterwards.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from sim_pipeline.core.layout import sha256_hex
from sim_pipeline.results.db import ResultsDB, _engine, masked
from sim_pipeline.results.query import delete_runs

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def chunk_rows(run_id: str, chunk: int, size: int) -> list[dict[str, object]]:
    rows = []
    for number in range(chunk * size, (chunk + 1) * size):
        url = f"https://images.example.com/photos/{number % 50_000:06d}/original.jpg"
        caption = f"a photograph of item {number} on a wooden table, soft window light"
        failed = number % 10 == 0
        rows.append({
            "run_id": run_id, "row_number": number, "image_url": url,
            "url_hash": sha256_hex(url), "caption": caption, "caption_hash": sha256_hex(caption),
            "model": "openai/clip-vit-base-patch32",
            "similarity": None if failed else round(0.55 + (number % 3000) / 10_000, 4),
            "cosine": None if failed else 0.1 + (number % 3000) / 5000,
            "error": "http_404" if failed else None,
            "input_fields": [f"id-{number}", url, caption, "batch-7"]})
    return rows


@contextmanager
def database(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    name = f"sim_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        _engine.cache_clear()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") \
        else ""
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}{load}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="default: a throwaway database on 127.0.0.1")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--chunk", type=int, default=10_000, help="rows per transaction")
    parser.add_argument("--method", choices=("copy", "executemany", "both"), default="both")
    args = parser.parse_args()
    chunks = max(1, args.rows // args.chunk)
    methods = ["copy", "executemany"] if args.method == "both" else [args.method]

    with database(args.database_url) as url:
        db = ResultsDB(url)
        with db.engine.connect() as conn:
            server = conn.execute(sa.text("SELECT version()")).scalar_one().split(" on ")[0]
        print(f"machine   {machine()}")
        print(f"database  {server} at {masked(db.url)}")
        print(f"rows      {chunks * args.chunk:,} in {chunks} chunks of {args.chunk:,} "
              "(one transaction each)")
        run_ids = []
        for method in methods:
            db.bulk_copy = method == "copy"
            run_id = f"bench-{method}-{uuid.uuid4().hex[:6]}"
            run_ids.append(run_id)
            db.start_run(run_id, "bench.csv", "openai/clip-vit-base-patch32",
                         chunks * args.chunk)
            data = [chunk_rows(run_id, c, args.chunk) for c in range(chunks)]
            for phase in ("insert", "re-upsert"):
                started = time.perf_counter()
                written = sum(db.upsert_scores(rows) for rows in data)
                seconds = time.perf_counter() - started
                print(f"{method:<12}{phase:<10} {written / seconds:>10,.0f} rows/s "
                      f"({written:,} rows in {seconds:.2f} s)")
        if args.database_url:
            delete_runs(db, run_ids)


if __name__ == "__main__":
    main()
