"""Airflow (make stack's topology) vs the CLI on the same CSV, side by side, per chunk size.

N pairs over M distinct ~50 KB JPEGs served from 127.0.0.1, both cold. For each chunk size a
fresh stack is started (``python -m bin.stack up``: CeleryExecutor, workers on queues fetch +
inference, the inference-server holding the model, PostgreSQL, Redis, SeaweedFS) and the run is
timed from the trigger to its end as the REST API reports them (``queued_at`` to ``end_date``);
`sim-pipeline score` then scores the same CSV as one process into a fresh store prefix of the same
S3 and results database. The stack's start-up (model load included) is printed apart: a
deployment pays it once. Also printed: the median embed task's wall time minus the model time
it paid itself (nothing: the inference-server holds the model). Goals: 5 chunks of 300 <= x1.3
the CLI's time, 20 chunks of 75 <= x2. Random ViT-B/32 weights (SIM_BENCH_MODEL_SHAPE=tiny for
a smoke run): the scores mean nothing, only the times do. Prints, never asserts.

Then where the Airflow run's time went: per task the medians of its gaps (its last upstream's
end -> scheduled -> queued -> started -> ended), the critical path, how many tasks of each pool
ran at once, each component's CPU seconds during the run (the load average is printed beside:
the CPUs are shared), and how long each task's Celery slot stayed taken after the task ended. The
run's task instances are kept as ``airflow-<size>.tasks.json`` in the work folder.

    .venv/bin/python -m bench.airflow [--pairs 1500] [--images 1200] [--chunk-sizes 300,75]
    .venv/bin/python -m bench.airflow --timeline WORK/airflow-75.tasks.json

Chunks below the trigger form's 100-row floor are planned by the CLI-free path the form cannot
reach: the benchmark sets ``SIM_PIPELINE_CHUNK_SIZE`` on the stack and triggers without
``chunk_size``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import served_pairs, vit_b32_checkpoint
from bin import stack
from bin.airflow_api import DAG_ID, AirflowApi

GOALS = {300: 1.3, 75: 2.0}
EMBED_TASKS = ("score_chunk.embed_images", "score_chunk.embed_texts")
WORKLOAD_FINISHED = re.compile(r"Workload finished.*?duration=(?P<seconds>[0-9.]+).*?"
                               r"workload_id=(?P<id>[0-9a-f-]+)")


def stack_call(*args: str, env: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, "-m", "bin.stack", *args], env=env,
                          cwd=stack.REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"stack {args[0]} failed:\n{done.stdout}\n{done.stderr}")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` prints them: the CPUs are shared."""
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


def cpu_line() -> str:
    """The CPU model and its vector flags: the figures depend on them."""
    model, flags = platform.processor() or "unknown CPU", ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            wanted = ("avx2", "avx512f", "avx512_vnni", "amx_tile", "fma")
            flags = " ".join(f for f in line.split(":", 1)[1].split() if f in wanted)
            break
    return f"CPU: {model}, {os.cpu_count()} CPUs, flags: {flags or 'none of avx2/avx512/fma'}"


def airflow_run(api: AirflowApi, source: Path, output: Path) -> dict[str, Any]:
    """The run's record, kept beside its output as ``*.tasks.json``: its trigger and end as
    Airflow records them, the DAG's edges and every task instance."""
    api.wait(api.has_dag, "the DAG to be parsed", 120)
    run_id = api.trigger({"csv_path": str(source), "output_path": str(output)})
    state = api.wait_for_run(run_id, timeout=3600)
    if state != "success":
        raise SystemExit(f"the Airflow run {run_id} ended {state}")
    run = api.call("GET", api.run_path(run_id))
    record = {"queued_at": run["queued_at"], "end_date": run["end_date"],
              "edges": dag_edges(api), "task_instances": api.task_instances(run_id)}
    output.with_suffix(".tasks.json").write_text(json.dumps(record, indent=1))
    return record


def run_seconds(record: dict[str, Any]) -> float:
    """Trigger to end."""
    started, ended = (datetime.fromisoformat(record[k]) for k in ("queued_at", "end_date"))
    return (ended - started).total_seconds()


def timeline(record: dict[str, Any]) -> list[str]:
    """``timeline_lines`` of a run's record, then how full each pool was."""
    trigger = datetime.fromisoformat(record["queued_at"])
    by_name = spans(record["task_instances"], trigger, record["edges"])
    return timeline_lines(by_name, run_seconds(record)) + pool_lines(
        record["task_instances"], trigger)


def pool_lines(tis: list[dict[str, Any]], trigger: datetime) -> list[str]:
    """Per pool, the seconds during which 0, 1, 2 ... of its tasks ran, from its first task's
    start to its last task's end: a slot empty while work waits is Airflow's cost."""
    lines = []
    for pool in sorted({ti["pool"] for ti in tis if ti.get("end_date")}):
        changes = sorted(
            ((datetime.fromisoformat(ti[key]) - trigger).total_seconds(), step)
            for ti in tis if ti["pool"] == pool and ti.get("end_date")
            for key, step in (("start_date", 1), ("end_date", -1)))
        held: dict[int, float] = {}
        running, last = 0, changes[0][0]
        for at, step in changes:
            held[running] = held.get(running, 0.0) + at - last
            running, last = running + step, at
        lines.append(f"  pool {pool}: tasks running at once, seconds: " + ", ".join(
            f"{n}: {held[n]:.1f}" for n in sorted(held)))
    return lines


@dataclass(frozen=True)
class Span:
    """One task instance on the run's clock (seconds since the trigger): when its last upstream
    ended (``ready``), when the scheduler set it scheduled and queued it, when its task process
    started and when it ended."""

    name: str
    ready: float
    scheduled: float
    queued: float
    start: float
    end: float
    upstream: str | None  # the upstream whose end made it ready: the critical path's link

    @property
    def gaps(self) -> dict[str, float]:
        return {"ready->scheduled": self.scheduled - self.ready,
                "scheduled->queued": self.queued - self.scheduled,
                "queued->start": self.start - self.queued, "start->end": self.end - self.start}


GAPS = ("ready->scheduled", "scheduled->queued", "queued->start", "start->end")


def spans(tis: list[dict[str, Any]], trigger: datetime,
          edges: dict[str, list[str]]) -> dict[str, Span]:
    """Each finished task instance as a ``Span``. An instance's upstreams are the instances of
    its upstream tasks with its own map index, or every index when either side is unmapped."""
    def at(value: str | None) -> float:
        return (datetime.fromisoformat(value) - trigger).total_seconds() if value else math.nan

    def key(ti: dict[str, Any]) -> str:
        index = ti["map_index"]
        return ti["task_id"] + (f"[{index}]" if index >= 0 else "")

    done = [ti for ti in tis if ti.get("end_date")]
    out: dict[str, Span] = {}
    for ti in done:
        ups = [u for u in done if u["task_id"] in edges.get(ti["task_id"], ())
               and (ti["map_index"] < 0 or u["map_index"] < 0
                    or u["map_index"] == ti["map_index"])]
        last = max(ups, key=lambda u: u["end_date"], default=None)
        queued = at(ti.get("queued_when"))
        out[key(ti)] = Span(key(ti), at(last["end_date"]) if last else 0.0,
                            at(ti.get("scheduled_when")) if ti.get("scheduled_when") else queued,
                            queued, at(ti["start_date"]), at(ti["end_date"]),
                            key(last) if last else None)
    return out


def critical_path(by_name: dict[str, Span]) -> list[Span]:
    """From the last task to end back to the trigger, each step the upstream that ended last."""
    path = [max(by_name.values(), key=lambda span: span.end)]
    while path[-1].upstream is not None:
        path.append(by_name[path[-1].upstream])
    return path[::-1]


def timeline_lines(by_name: dict[str, Span], total: float) -> list[str]:
    """Medians of each gap per task, then the critical path with its gaps summed."""
    lines = [f"  where the time goes ({len(by_name)} task instances, medians in s; "
             "ready = its last upstream ended):",
             f"    {'task':28} {'n':>3} " + " ".join(f"{g:>17}" for g in GAPS)]
    for task in dict.fromkeys(name.split("[")[0] for name in by_name):
        group = [s for n, s in by_name.items() if n.split("[")[0] == task]
        medians = [statistics.median(s.gaps[g] for s in group) for g in GAPS]
        lines.append(f"    {task:28} {len(group):>3} " + " ".join(f"{m:17.2f}" for m in medians))
    path = critical_path(by_name)
    sums = {g: sum(s.gaps[g] for s in path) for g in GAPS}
    lines.append(f"  critical path ({len(path)} tasks of the {total:.1f} s from trigger to end): "
                 + ", ".join(f"{g} {v:.1f} s" for g, v in sums.items())
                 + f", after its last task {total - path[-1].end:.1f} s")
    lines += [f"    {s.name:32} ready {s.ready:6.1f} scheduled {s.scheduled:6.1f} queued "
              f"{s.queued:6.1f} start {s.start:6.1f} end {s.end:6.1f}" for s in path]
    return lines


def dag_edges(api: AirflowApi) -> dict[str, list[str]]:
    """Task id -> its upstream task ids, as the DAG's REST view has them."""
    tasks = api.call("GET", f"/dags/{DAG_ID}/tasks")["tasks"]
    edges: dict[str, list[str]] = {t["task_id"]: [] for t in tasks}
    for t in tasks:
        for down in t["downstream_task_ids"]:
            edges[down].append(t["task_id"])
    return edges


def held_past_end(home: Path, tis: list[dict[str, Any]]) -> list[str]:
    """How long each task's worker slot stayed taken after the task's end: the supervisor's
    ``Workload finished`` duration in the workers' logs minus the task instance's duration. The
    next task on that worker cannot start before it."""
    durations = {ti["id"]: float(ti["duration"]) for ti in tis if ti.get("duration") is not None}
    extra = []
    for log in sorted((home / "logs").glob("worker-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            found = WORKLOAD_FINISHED.search(line)
            if found and found["id"] in durations:
                extra.append(float(found["seconds"]) - durations[found["id"]])
    if not extra:
        return []
    return [f"  worker slot held past the task's end ({len(extra)} tasks): median "
            f"{statistics.median(extra):.2f} s, max {max(extra):.2f} s, over 1 s: "
            f"{sum(e > 1 for e in extra)}, over 2 s: {sum(e > 2 for e in extra)}"]


def cpu_seconds(home: Path) -> dict[str, float]:
    """CPU seconds used so far by each component of the stack in ``home``: every process of its
    process group (``up`` starts each in its own session), with the children it has reaped (the
    workers' task processes)."""
    state = json.loads((home / "state.json").read_text())
    groups = {entry["pid"]: name for name, entry in state["components"].items()}
    used = dict.fromkeys(groups.values(), 0.0)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in groups:  # field 5, the process group
            ticks = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
            used[groups[int(fields[2])]] += ticks / os.sysconf("SC_CLK_TCK")
    return used


def cpu_lines(before: dict[str, float], after: dict[str, float], seconds: float) -> list[str]:
    """Each component's CPU seconds during the run, busiest first, against what the CPUs had."""
    spent = sorted(((after[n] - before.get(n, 0.0), n) for n in after), reverse=True)
    return [f"  CPU seconds during the run ({os.cpu_count()} CPUs x {seconds:.0f} s = "
            f"{os.cpu_count() * seconds:.0f} available; PostgreSQL and Redis not counted): "
            + ", ".join(f"{name} {used:.1f}" for used, name in spent)]


def cli_run(source: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("sim-pipeline")), "score", str(source),
                    "--quiet"], env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def one_size(base: dict[str, str], source: Path, work: Path,
             chunk_size: int) -> tuple[dict[str, float], list[str]]:
    """A fresh stack for one chunk size: its start-up, the run, the embed tasks, the CLI."""
    base = {**base, "SIM_PIPELINE_CHUNK_SIZE": str(chunk_size)}
    home, port = work / f"stack-{chunk_size}", stack.free_port()
    started = time.perf_counter()
    try:  # an interrupted up leaves a supervisor behind: down stops it either way
        stack_call("up", "--home", str(home), "--port", str(port),
                   "--name", f"sim_bench_{uuid.uuid4().hex[:8]}", env=base)
        startup = time.perf_counter() - started
        config = stack.read_config(home)
        assert config is not None
        before = cpu_seconds(home)
        record = airflow_run(AirflowApi(port), source, work / f"airflow-{chunk_size}.csv")
        cpu = cpu_lines(before, cpu_seconds(home), run_seconds(record))
        cpu += held_past_end(home, record["task_instances"])
        cli_env = {**stack.component_environ(config, base, "cli"),
                   "SIM_PIPELINE_STORE": f"s3://{config.bucket}/cli-{chunk_size}"}
        cli = cli_run(source, cli_env)
    finally:
        stack_call("down", "--home", str(home), "--purge", env=base)
    embeds = [float(ti["duration"]) for ti in record["task_instances"]
              if ti["task_id"] in EMBED_TASKS and ti["duration"] is not None]
    return {"startup": startup, "airflow": run_seconds(record), "cli": cli,
            "embed_median": statistics.median(embeds), "embed_tasks": len(embeds)}, \
        timeline(record) + cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1500)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--chunk-sizes", default="300,75",
                        help="comma-separated rows per chunk, one fresh stack each")
    parser.add_argument("--timeline", type=Path, metavar="TASKS_JSON",
                        help="only print where the time of a recorded run went (the "
                             "airflow-<size>.tasks.json a run leaves in its work folder)")
    args = parser.parse_args()
    if args.timeline:
        record = json.loads(args.timeline.read_text())
        print(f"run of {run_seconds(record):.1f} s, trigger to end")
        print("\n".join(timeline(record)))
        return
    sizes = [int(size) for size in args.chunk_sizes.split(",")]

    model = str(vit_b32_checkpoint())
    server, base_url, work, source = served_pairs("airflow", args.images, args.pairs)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("AIRFLOW", "SIM_PIPELINE_", "AWS_"))}
    base.update(SIM_PIPELINE_MODEL=model, HF_HUB_OFFLINE="1",
                SIM_PIPELINE_ALLOW_HOSTS=base_url.removeprefix("http://"))
    print(f"{args.pairs} pairs over {args.images} distinct 640x480 JPEGs, cold, model: random "
          f"weights ({os.environ.get('SIM_BENCH_MODEL_SHAPE', 'vit-b-32')}), scores meaningless")
    print(cpu_line(), flush=True)
    try:
        for size in sizes:  # each size's figures as soon as they are measured
            figures, lines = one_size(base, source, work, size)
            report(size, args.pairs, figures)
            print("\n".join(lines), flush=True)
    finally:
        server.shutdown()


def report(size: int, pairs: int, r: dict[str, float]) -> None:
    goal = GOALS.get(size)
    print(f"chunk_size {size} ({-(-pairs // size)} chunks): stack start-up (once per deployment, "
          f"model load included) {r['startup']:.1f} s; load average now {load_average()}")
    print(f"  airflow (make stack, CeleryExecutor) {r['airflow']:7.1f} s "
          f"{pairs / r['airflow']:8.1f} pairs/s")
    print(f"  sim-pipeline score (one process)     {r['cli']:7.1f} s "
          f"{pairs / r['cli']:8.1f} pairs/s")
    print(f"  airflow / cli: x{r['airflow'] / r['cli']:.2f}"
          + (f" (goal <= x{goal:.1f})" if goal else ""))
    print(f"  median embed task ({int(r['embed_tasks'])} tasks): {r['embed_median']:.1f} s wall, "
          f"minus model time in the task 0.0 s (the inference-server holds the model) = "
          f"{r['embed_median']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
