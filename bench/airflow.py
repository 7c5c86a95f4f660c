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

    .venv/bin/python -m bench.airflow [--pairs 1500] [--images 1200] [--chunk-sizes 300,75]

Chunks below the trigger form's 100-row floor are planned by the CLI-free path the form cannot
reach: the benchmark sets ``SIM_PIPELINE_CHUNK_SIZE`` on the stack and triggers without
``chunk_size``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

from bench.common import served_pairs, vit_b32_checkpoint
from bin import stack
from bin.airflow_api import AirflowApi

GOALS = {300: 1.3, 75: 2.0}
EMBED_TASKS = ("score_chunk.embed_images", "score_chunk.embed_texts")


def stack_call(*args: str, env: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, "-m", "bin.stack", *args], env=env,
                          cwd=stack.REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"stack {args[0]} failed:\n{done.stdout}\n{done.stderr}")


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


def airflow_run(api: AirflowApi, source: Path, output: Path) -> tuple[float, list[float]]:
    """Trigger to end, in seconds (the run's own times as Airflow records them), and each embed
    task's wall time."""
    api.wait(api.has_dag, "the DAG to be parsed", 120)
    run_id = api.trigger({"csv_path": str(source), "output_path": str(output)})
    state = api.wait_for_run(run_id, timeout=3600)
    if state != "success":
        raise SystemExit(f"the Airflow run {run_id} ended {state}")
    run = api.call("GET", api.run_path(run_id))
    started, ended = (datetime.fromisoformat(run[k]) for k in ("queued_at", "end_date"))
    embeds = [float(ti["duration"]) for ti in api.task_instances(run_id)
              if ti["task_id"] in EMBED_TASKS and ti["duration"] is not None]
    return (ended - started).total_seconds(), embeds


def cli_run(source: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("sim-pipeline")), "score", str(source),
                    "--quiet"], env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def one_size(base: dict[str, str], source: Path, work: Path, chunk_size: int) -> dict[str, float]:
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
        seconds, embeds = airflow_run(AirflowApi(port), source, work / f"airflow-{chunk_size}.csv")
        cli_env = {**stack.component_environ(config, base, "cli"),
                   "SIM_PIPELINE_STORE": f"s3://{config.bucket}/cli-{chunk_size}"}
        cli = cli_run(source, cli_env)
    finally:
        stack_call("down", "--home", str(home), "--purge", env=base)
    return {"startup": startup, "airflow": seconds, "cli": cli,
            "embed_median": statistics.median(embeds), "embed_tasks": len(embeds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1500)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--chunk-sizes", default="300,75",
                        help="comma-separated rows per chunk, one fresh stack each")
    args = parser.parse_args()
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
            report(size, args.pairs, one_size(base, source, work, size))
    finally:
        server.shutdown()


def report(size: int, pairs: int, r: dict[str, float]) -> None:
    goal = GOALS.get(size)
    print(f"chunk_size {size} ({-(-pairs // size)} chunks): stack start-up (once per deployment, "
          f"model load included) {r['startup']:.1f} s")
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
