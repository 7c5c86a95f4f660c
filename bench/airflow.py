"""Airflow (make stack's topology) vs the CLI on the same CSV, side by side in one run.

N pairs over M distinct ~50 KB JPEGs served from 127.0.0.1, chunk_size 1,000, cold: the stack is
started fresh (bin/stack.py: CeleryExecutor, workers on queues fetch + inference, PostgreSQL,
Redis, SeaweedFS), and the run is timed from the trigger to its success as the REST API reports
it; `sim-pipeline score` then scores the same CSV as one process into the same S3 store and
results database. The stack's start-up is printed apart: a deployment pays it once. Goal: Airflow
wall time <= 1.5x the CLI's. Random ViT-B/32 weights (SIM_BENCH_MODEL_SHAPE=tiny for a smoke run):
the scores mean nothing, only the times do. Prints, never asserts.

    .venv/bin/python -m bench.airflow [--pairs 3000] [--images 2400] [--chunk-size 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path
from types import ModuleType

from bench.common import served_pairs, vit_b32_checkpoint
from tests.airflow_helpers import AirflowApi, free_port, load_stack

REPO = Path(__file__).resolve().parent.parent
STACK = REPO / "bin" / "stack.py"


def stack_call(*args: str, env: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, str(STACK), *args], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"stack {args[0]} failed:\n{done.stdout}\n{done.stderr}")


def airflow_run(api: AirflowApi, source: Path, output: Path, chunk_size: int) -> float:
    """Trigger to success, in seconds (the run's own start and end as Airflow records them)."""
    api.wait(api.has_dag, "the DAG to be parsed", 120)
    run_id = api.trigger({"csv_path": str(source), "output_path": str(output),
                          "chunk_size": chunk_size})
    state = api.wait_for_run(run_id, timeout=3600)
    if state != "success":
        raise SystemExit(f"the Airflow run {run_id} ended {state}")
    run = api.call("GET", api.run_path(run_id))
    started, ended = (datetime.fromisoformat(run[k]) for k in ("queued_at", "end_date"))
    return (ended - started).total_seconds()


def cli_run(source: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("sim-pipeline")), "score", str(source),
                    "--quiet"], env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def library_env(stack: ModuleType, config: object, base: dict[str, str],
                chunk_size: int, store: str = "cli-store") -> dict[str, str]:
    """The environment of a library process (the CLI, the service) beside the stack: the
    stack's results database, its S3 endpoint and keys, the store prefix ``store`` of the
    bucket (the CLI's own by default)."""
    return {**stack.component_environ(config, base, "cli"),
            "AWS_ENDPOINT_URL": config.s3_endpoint, "AWS_ACCESS_KEY_ID": stack.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": stack.SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
            "SIM_PIPELINE_STORE": f"s3://{config.bucket}/{store}",
            "SIM_PIPELINE_CHUNK_SIZE": str(chunk_size)}


def start_service(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    """``sim-pipeline serve`` holding the model, ready when this returns."""
    service = subprocess.Popen([str(Path(sys.executable).with_name("sim-pipeline")), "serve",
                                "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise SystemExit("sim-pipeline serve exited while starting")
        with contextlib.suppress(OSError), \
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
            return service
        time.sleep(0.5)
    raise SystemExit("sim-pipeline serve did not become ready")


def stack_run(stack: ModuleType, base: dict[str, str], source: Path, work: Path,
              chunk_size: int, served: bool) -> tuple[float, float, float | None]:
    """A fresh stack: (start-up s, Airflow run s, CLI s or None). ``served``: the embed tasks
    go to a ``sim-pipeline serve`` beside the stack (``SIM_PIPELINE_INFERENCE_URL``) instead of
    loading the model in each task; it shares the stack's store and results database."""
    base, service_port = dict(base), free_port()
    if served:
        base["SIM_PIPELINE_INFERENCE_URL"] = f"http://127.0.0.1:{service_port}"
    home, port = work / ("stack-served" if served else "stack"), free_port()
    started = time.perf_counter()
    stack_call("up", "--home", str(home), "--port", str(port),
               "--name", f"sim_bench_{uuid.uuid4().hex[:8]}", env=base)
    service = None
    try:
        startup = time.perf_counter() - started
        config = stack.StackConfig(**stack.read_state(home)["config"])
        if served:
            # The stack's own store (bin/stack.py: s3://<bucket>/store), shared with its tasks.
            service_env = library_env(stack, config, base, chunk_size, store="store")
            service = start_service(service_env, service_port)
        seconds = airflow_run(AirflowApi(port), source, work / f"airflow-{served}.csv",
                              chunk_size)
        cli = None if served else cli_run(source, library_env(stack, config, base, chunk_size))
    finally:
        if service is not None:
            service.terminate()
            service.wait()
        stack_call("down", "--home", str(home), "--purge", env=base)
    return startup, seconds, cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--images", type=int, default=2400)
    parser.add_argument("--chunk-size", type=int, default=1000)
    parser.add_argument("--service", action="store_true",
                        help="also time a second stack whose embed tasks use sim-pipeline serve")
    args = parser.parse_args()

    stack = load_stack()
    model = str(vit_b32_checkpoint())
    server, base_url, work, source = served_pairs("airflow", args.images, args.pairs)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("AIRFLOW", "SIM_PIPELINE_", "AWS_"))}
    base.update(SIM_PIPELINE_MODEL=model, HF_HUB_OFFLINE="1",
                SIM_PIPELINE_ALLOW_HOSTS=base_url.removeprefix("http://"))
    print(f"{args.pairs} pairs over {args.images} distinct 640x480 JPEGs, chunk_size "
          f"{args.chunk_size}, {os.cpu_count()} CPUs, model: random weights "
          f"({os.environ.get('SIM_BENCH_MODEL_SHAPE', 'vit-b-32')}), scores meaningless")
    try:
        startup, airflow, cli = stack_run(stack, base, source, work, args.chunk_size, False)
        if args.service:
            _, served, _ = stack_run(stack, base, source, work, args.chunk_size, True)
    finally:
        server.shutdown()
    print(f"stack start-up (once per deployment) {startup:7.1f} s")
    print(f"airflow (make stack, CeleryExecutor) {airflow:7.1f} s "
          f"{args.pairs / airflow:8.1f} pairs/s")
    print(f"sim-pipeline score (one process)     {cli:7.1f} s {args.pairs / cli:8.1f} pairs/s")
    print(f"airflow / cli: x{airflow / cli:.2f} (goal <= x1.50)")
    if args.service:
        print(f"airflow, embedding through sim-pipeline serve {served:7.1f} s "
              f"{args.pairs / served:8.1f} pairs/s")
        print(f"airflow with the service / without: x{served / airflow:.2f}")


if __name__ == "__main__":
    main()
