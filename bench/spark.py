"""Spark (``local-cluster[2,1,1024]``) vs ``sim-pipeline score`` on the same CSV, side by side.

N pairs over M distinct ~50 KB JPEGs served from 127.0.0.1, both cold: each starts from an empty
object store and runs as its own process, timed from start to exit (Spark's includes starting
the driver, the master and two executor JVMs with their Python workers). Goal: Spark's wall time
<= 1.3x the CLI's on a 2-core machine. Also printed: how many Python workers loaded the model and
how many towers each loaded (the model should load once per worker). Random ViT-B/32 weights
(SIM_BENCH_MODEL_SHAPE=tiny for a smoke run): the scores mean nothing, only the times do.
Prints, never asserts.

``--timeline`` also prints where Spark's time went, from Spark's event log (executors registered,
each job and stage, each task's deserialisation, run and GC time) and from the notes each Python
worker leaves in the store (its imports done, each batch's stages and the towers it loaded), all
in seconds since the command was launched. ``--conf KEY=VALUE`` passes a Spark setting to the
command (through ``PYSPARK_SUBMIT_ARGS``), ``--spark-only`` skips the CLI run, to try settings.
Spark's event log is written only for ``--timeline``. The first Spark command on a machine makes
the JVMs' class-data archives (a few seconds more), later ones start from them: each round
says which (``SIM_PIPELINE_JVM_ARCHIVES=off`` runs without). ``--repeat N`` runs N rounds (CLI, then
Spark, fresh stores each) and prints every ratio and their median: one round on a shared
machine moves by 10% and more.

    .venv/bin/python -m bench.spark [--pairs 1000] [--images 800] [--master local-cluster[2,1,1024]]
                                    [--timeline] [--conf KEY=VALUE ...] [--spark-only]
                                    [--repeat N]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import served_pairs, vit_b32_checkpoint
from sim_pipeline.core.config import load_settings
from sim_pipeline.core.store import open_store, read_json
from sim_pipeline.spark.executor import MODEL_LOADS_PREFIX
from sim_pipeline.spark.session import class_archives

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


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """The command's wall time, and when it was launched (Unix time, for the timeline)."""
    launched, started = time.time(), time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:2])} failed:\n{done.stderr[-3000:]}")
    return seconds, launched


def load_line() -> str:
    return "load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def event_log(folder: Path) -> list[dict]:
    """The events of the one application logged in ``folder`` (finished or not)."""
    events = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.stat().st_size):
        with path.open(encoding="utf-8") as handle:
            events += [json.loads(line) for line in handle if line.strip()]
    return events


def spark_timeline(events: list[dict], launched: float) -> list[tuple[float, str]]:
    """(seconds since launch, what happened) from Spark's event log."""
    def at(ms: int) -> float:
        return ms / 1000 - launched

    lines, calls, stages = [], {}, {}
    for event in events:
        kind = event["Event"].removeprefix("SparkListener")
        if kind in ("ApplicationStart", "ApplicationEnd"):
            lines.append((at(event["Timestamp"]), f"application {kind[11:].lower()}"))
        elif kind == "ExecutorAdded":
            lines.append((at(event["Timestamp"]), f"executor {event['Executor ID']} registered"))
        elif kind == "JobStart":
            calls[event["Job ID"]] = (event["Submission Time"],
                                      event.get("Properties", {}).get("callSite.short", "?"))
        elif kind == "JobEnd":
            started, call = calls[event["Job ID"]]
            lines.append((at(started), f"job {event['Job ID']} ({call}) "
                          f"{(event['Completion Time'] - started) / 1000:.1f} s"))
        elif kind == "StageSubmitted":
            info = event["Stage Info"]
            stages[info["Stage ID"]] = info.get("Stage Name", "?")[:40]
        elif kind == "TaskEnd":
            lines.append(task_line(event, stages.get(event["Stage ID"], "?"), launched))
    return lines


def task_line(event: dict, stage_name: str, launched: float) -> tuple[float, str]:
    task, metrics = event["Task Info"], event.get("Task Metrics") or {}
    took = (task["Finish Time"] - task["Launch Time"]) / 1000
    parts = ", ".join(f"{name} {metrics.get(key, 0) / 1000:.1f}" for name, key in (
        ("deserialise", "Executor Deserialize Time"), ("run", "Executor Run Time"),
        ("GC", "JVM GC Time")))
    return (task["Launch Time"] / 1000 - launched,
            f"  task {task['Task ID']} of stage {event['Stage ID']} ({stage_name}) on executor "
            f"{task['Executor ID']}: {took:.1f} s ({parts})")


def worker_timeline(notes: list[dict], launched: float) -> list[tuple[float, str]]:
    """(seconds since launch, what happened) from the Python workers' notes."""
    lines = []
    for note in notes:
        pid = note["pid"]
        lines.append((note["imported"] - launched, f"python worker {pid}: imports done"))
        for batch in note.get("batches", []):
            steps = ", ".join(
                f"{step['stage']} {step['seconds']:.1f}"
                + (f" (+{step['towers_loaded']} towers)" if step["towers_loaded"] else "")
                for step in batch["stages"])
            lines.append((batch["start"] - launched, f"python worker {pid}: batch of "
                          f"{batch['rows']} rows {batch['seconds']:.1f} s: {steps}"))
    return lines


def print_timeline(lines: list[tuple[float, str]]) -> None:
    print("timeline (s since the spark command was launched):")
    for seconds, what in sorted(lines, key=lambda line: line[0]):
        print(f"  {seconds:6.1f}  {what}")


def rows_of(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--master", default="local-cluster[2,1,1024]")
    parser.add_argument("--timeline", action="store_true", help="print where Spark's time went")
    parser.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE",
                        help="a Spark setting for the spark command (repeatable)")
    parser.add_argument("--spark-only", action="store_true", help="skip the CLI run")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of CLI then Spark; prints each ratio and their median")
    args = parser.parse_args()

    model = str(vit_b32_checkpoint())
    server, base_url, work, source = served_pairs("spark", args.images, args.pairs)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SIM_PIPELINE_") or k == "SIM_PIPELINE_JVM_ARCHIVES"}
    env.update(SIM_PIPELINE_MODEL=model, HF_HUB_OFFLINE="1", SPARK_LOCAL_IP="127.0.0.1",
               SIM_PIPELINE_ALLOW_HOSTS=base_url.removeprefix("http://"),
               SIM_PIPELINE_DATABASE_URL=f"sqlite:///{work / 'results.db'}")
    print(cpu_line())
    print(f"{args.pairs} pairs over {args.images} distinct 640x480 JPEGs, cold (empty stores), "
          f"model: random weights ({os.environ.get('SIM_BENCH_MODEL_SHAPE', 'vit-b-32')}), "
          "scores meaningless")
    if args.conf:
        print(f"spark settings: {' '.join(args.conf)}")
    print(load_line())
    ratios = []
    try:
        for round_ in range(1, args.repeat + 1):
            ratio = one_round(args, source, work / f"round-{round_}", env)
            ratios += [] if ratio is None else [ratio]
    finally:
        server.shutdown()
    if len(ratios) > 1:
        print(f"spark / cli over {len(ratios)} rounds: "
              f"{', '.join(f'x{r:.2f}' for r in ratios)}; median x{statistics.median(ratios):.2f} "
              "(goal <= x1.30)")


def one_round(args: argparse.Namespace, source: Path, work: Path,
              env: dict[str, str]) -> float | None:
    """The CLI, then Spark, each cold in stores of their own; prints both and returns their
    ratio (None with ``--spark-only``)."""
    program = str(Path(sys.executable).with_name("sim-pipeline"))
    events = work / "spark-events"
    events.mkdir(parents=True)
    confs = [*args.conf, *(["spark.eventLog.enabled=true", f"spark.eventLog.dir=file://{events}",
                            "spark.eventLog.compress=false", "spark.eventLog.rolling.enabled=false"]
                           if args.timeline else [])]  # as a user runs it, unless asked
    spark_env = {**env, "PYSPARK_SUBMIT_ARGS": " ".join(
        f"--conf {shlex.quote(conf)}" for conf in confs) + " pyspark-shell"}
    cli = None if args.spark_only else timed(
        [program, "score", str(source), "-o", str(work / "cli.csv"), "--quiet",
         "--store", str(work / "cli-store")], env)[0]
    print(f"{load_line()} (after the CLI)")
    archives = class_archives(args.master, load_settings().jvm_archives)
    print("JVM class archives: " + ("off" if archives is None else "made by this run"
                                    if archives.making_any() else "used, from a run before"))
    spark, launched = timed([program, "spark", str(source), str(work / "spark.csv"),
                             "--master", args.master, "--run-id", RUN_ID,
                             "--store", str(work / "spark-store")], spark_env)
    print(f"{load_line()} (after Spark)")
    store = open_store(str(work / "spark-store"))
    notes = [read_json(store, key) for key in store.list_keys()
             if key.startswith(f"{MODEL_LOADS_PREFIX}/{RUN_ID}/")]
    towers = sorted(note["tower_loads"] for note in notes)
    if args.timeline:
        print_timeline(spark_timeline(event_log(events), launched)
                       + worker_timeline(notes, launched) + [(spark, "command exited")])
    print(f"sim-pipeline spark ({args.master}) {spark:7.1f} s {args.pairs / spark:7.1f} pairs/s")
    print(f"model loads: {len(notes)} Python workers loaded it, towers loaded per worker: "
          f"{towers} (2 = image + text, once)")
    if cli is None:
        return None
    same = rows_of(work / "spark.csv") == rows_of(work / "cli.csv")
    print(f"sim-pipeline score (one process)           {cli:7.1f} s "
          f"{args.pairs / cli:7.1f} pairs/s")
    print(f"spark / cli: x{spark / cli:.2f} (goal <= x1.30); rows identical: {same}")
    return spark / cli

if __name__ == "__main__":
    main()
