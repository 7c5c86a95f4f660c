"""Spark (``local-cluster[2,1,1024]``) vs ``sim-pipeline score`` on the same CSV, side by side.

N pairs over M distinct ~50 KB JPEGs served from 127.0.0.1, both cold: each starts from an empty
object store and runs as its own process, timed from start to exit (Spark's includes starting
the driver, the master and two executor JVMs with their Python workers). Goal: Spark's wall time
<= 1.3x the CLI's on a 2-core machine. Also printed: how many Python workers loaded the model and
how many towers each loaded (the model should load once per worker). Random ViT-B/32 weights
(SIM_BENCH_MODEL_SHAPE=tiny for a smoke run): the scores mean nothing, only the times do.
Prints, never asserts.

    .venv/bin/python -m bench.spark [--pairs 1000] [--images 800] [--master local-cluster[2,1,1024]]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench.common import served_pairs, vit_b32_checkpoint
from sim_pipeline.core.store import open_store, read_json
from sim_pipeline.spark.executor import MODEL_LOADS_PREFIX

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
RUN_ID = "bench-spark"


def cpu_line() -> str:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    shown = " ".join(f for f in CPU_FLAGS if f in flags) or "none of " + " ".join(CPU_FLAGS)
    return f"CPU: {model}, {os.cpu_count()} cores, flags: {shown}"


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:2])} failed:\n{done.stderr[-3000:]}")
    return seconds


def rows_of(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--master", default="local-cluster[2,1,1024]")
    args = parser.parse_args()

    model = str(vit_b32_checkpoint())
    server, base_url, work, source = served_pairs("spark", args.images, args.pairs)
    program = str(Path(sys.executable).with_name("sim-pipeline"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIM_PIPELINE_")}
    env.update(SIM_PIPELINE_MODEL=model, HF_HUB_OFFLINE="1", SPARK_LOCAL_IP="127.0.0.1",
               SIM_PIPELINE_ALLOW_HOSTS=base_url.removeprefix("http://"),
               SIM_PIPELINE_DATABASE_URL=f"sqlite:///{work / 'results.db'}")
    print(cpu_line())
    print(f"{args.pairs} pairs over {args.images} distinct 640x480 JPEGs, cold (empty stores), "
          f"model: random weights ({os.environ.get('SIM_BENCH_MODEL_SHAPE', 'vit-b-32')}), "
          "scores meaningless")
    try:
        cli = timed([program, "score", str(source), "-o", str(work / "cli.csv"), "--quiet",
                     "--store", str(work / "cli-store")], env)
        spark = timed([program, "spark", str(source), str(work / "spark.csv"),
                       "--master", args.master, "--run-id", RUN_ID,
                       "--store", str(work / "spark-store")], env)
    finally:
        server.shutdown()
    same = rows_of(work / "spark.csv") == rows_of(work / "cli.csv")
    store = open_store(str(work / "spark-store"))
    notes = [read_json(store, key) for key in store.list_keys()
             if key.startswith(f"{MODEL_LOADS_PREFIX}/{RUN_ID}/")]
    towers = sorted(note["tower_loads"] for note in notes)
    print(f"sim-pipeline score (one process)           {cli:7.1f} s "
          f"{args.pairs / cli:7.1f} pairs/s")
    print(f"sim-pipeline spark ({args.master}) {spark:7.1f} s {args.pairs / spark:7.1f} pairs/s")
    print(f"spark / cli: x{spark / cli:.2f} (goal <= x1.30); rows identical: {same}")
    print(f"model loads: {len(notes)} Python workers loaded it, towers loaded per worker: "
          f"{towers} (2 = image + text, once)")


if __name__ == "__main__":
    main()
