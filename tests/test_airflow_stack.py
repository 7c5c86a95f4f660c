"""`make stack` for real: CeleryExecutor, two workers on queues, PostgreSQL, Redis, SeaweedFS.

One stack (bin/stack.py up) serves the session, in its own databases, Redis database and folder.
A 2,000-row CSV goes from s3:// to s3:// through it with a tiny random-weight model (its scores
mean nothing) and images from a server on 127.0.0.1. While the run is embedding, the inference
worker is killed with SIGKILL: the stack restarts it, the scheduler fails the task that lost its
worker and retries it, and the run still succeeds with exactly one results row per input row.
The embed tasks are clients of the stack's inference-server, which holds the model. With the
last chunk's images on a slow host, an earlier chunk is scored before that chunk's fetch ends
(depth-first). A shell under `bin.stack env` reaches the stack with `airflow` and `sim-pipeline
results`. Every listener of the stack binds 127.0.0.1, and `down` leaves no process of it behind;
`down --purge` after it drops the databases.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import sqlalchemy as sa

from bin import stack as stack_module
from bin.airflow_api import AirflowApi
from tests.airflow_helpers import (
    PYTHON,
    REPO,
    free_port,
    run_status,
    score_rows,
    write_pairs,
)
from tests.conftest import ImageServer, Route, make_image
from tests.pairs import serve_good_images

ROWS = 2_000
CHUNK_SIZE = 250  # eight chunks: enough embed tasks to kill a worker in the middle of one
VICTIM = "worker-inference"
SLOW_SECONDS = 3.0  # per image of the depth-first run's last chunk
EMBED_TASKS = ("score_chunk.embed_images", "score_chunk.embed_texts")


@dataclass
class Stack:
    home: Path
    api: AirflowApi
    config: Any  # bin/stack.py's StackConfig

    def state(self) -> dict[str, Any]:
        state = stack_module.read_state(self.home)
        assert state is not None, "the stack has no state file"
        return state

    def s3(self) -> Any:
        return boto3.client("s3", endpoint_url=self.config.s3_endpoint, region_name="us-east-1",
                            aws_access_key_id=stack_module.ACCESS_KEY,
                            aws_secret_access_key=stack_module.SECRET_KEY)

    @property
    def results_url(self) -> str:
        return self.config.database_url(self.config.results_db, "postgresql+psycopg")


def stack_command(*args: str, env: dict[str, str], timeout: float) -> str:
    done = subprocess.run([PYTHON, "-m", "bin.stack", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"stack {args[0]} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="session")
def caller_env(tiny_model: Path, image_server: ImageServer) -> dict[str, str]:
    """What a user exports before `make stack`: the model and the scoring settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "SIM_PIPELINE_", "AWS_", "_AIRFLOW"))}
    env.update(SIM_PIPELINE_MODEL=str(tiny_model), SIM_PIPELINE_DEVICE="cpu",
               SIM_PIPELINE_BATCH_SIZE="32", SIM_PIPELINE_FETCH_TIMEOUT="5",
               SIM_PIPELINE_ALLOW_HOSTS=image_server.allow_hosts, HF_HUB_OFFLINE="1",
               SIM_STACK_GPU_SLOTS="2")  # both of the inference worker's slots
    return env


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_admin_url: str,
          caller_env: dict[str, str]) -> Iterator[Stack]:
    """One stack for every test of the session; its names derive from its folder."""
    home, port = tmp_path_factory.mktemp(f"stack-{uuid.uuid4().hex[:6]}"), free_port()
    try:
        printed = stack_command("up", "--home", str(home), "--port", str(port), "--postgres",
                                pg_admin_url, env=caller_env, timeout=300)
        config = stack_module.read_config(home)
        assert config is not None and config.name == stack_module.stack_name(home)
        assert f"databases {config.airflow_db} (Airflow) and {config.results_db}" in printed
        assert f"broker redis://127.0.0.1:6379/{config.redis_db}" in printed
        assert "schedule none: manual runs only" in printed
        live = Stack(home, AirflowApi(port), config)
        live.api.wait(live.api.has_dag, "the dag-processor to parse the DAG", 90)
        yield live
    finally:
        if stack_module.read_config(home) is not None:  # a failed test left it running
            stack_command("down", "--home", str(home), "--purge", env=caller_env, timeout=180)


def stack_pids(state: dict[str, Any]) -> set[int]:
    """Every live process in the process groups of the stack's components."""
    groups = {entry["pid"] for entry in state["components"].values()}
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in groups:  # field 5 of /proc/PID/stat: the process group
            pids.add(int(stat.parent.name))
    return pids


def listeners(pids: set[int]) -> list[str]:
    """The local addresses the given processes listen on (TCP), from `ss -ltnpH`."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        if any(f"pid={pid}," in line for pid in pids):
            found.append(line.split()[3])
    return found


def test_every_listener_of_the_stack_binds_loopback(stack: Stack) -> None:
    addresses = listeners(stack_pids(stack.state()))
    assert f"127.0.0.1:{stack.config.port}" in addresses  # the api-server
    assert f"127.0.0.1:{stack.config.seaweed_ports['s3']}" in addresses
    assert addresses and all(a.startswith("127.0.0.1:") for a in addresses), addresses


def wait_until_running_on(stack: Stack, run_id: str, worker: str, timeout: float = 180) -> str:
    """The task id of a task instance the worker is running now."""
    found: list[str] = []

    def running() -> bool:
        found.extend(ti["task_id"] for ti in stack.api.task_instances(run_id)
                     if ti["state"] == "running" and ti["hostname"] == worker)
        return bool(found)

    stack.api.wait(running, f"a task running on {worker}", timeout)
    return found[0]


@pytest.fixture(scope="session")
def killed_run(stack: Stack, image_server: ImageServer, tmp_path_factory: pytest.TempPathFactory
               ) -> dict[str, Any]:
    """The 2,000-row run, with the inference worker SIGKILLed in the middle of an embed task."""
    urls = serve_good_images(image_server, ROWS, prefix="stack")
    local = write_pairs(tmp_path_factory.mktemp("stack-input") / "pairs.csv", urls)
    bucket = stack.config.bucket
    stack.s3().upload_file(str(local), bucket, "input/pairs.csv")
    started = time.monotonic()
    run_id = stack.api.trigger({"csv_path": f"s3://{bucket}/input/pairs.csv",
                                "output_path": f"s3://{bucket}/output/scored.csv",
                                "chunk_size": CHUNK_SIZE})
    task = wait_until_running_on(stack, run_id, VICTIM)
    victim = stack.state()["components"][VICTIM]["pid"]
    os.kill(victim, signal.SIGKILL)
    state = stack.api.wait_for_run(run_id, timeout=300)
    return {"run_id": run_id, "state": state, "killed_during": task, "victim": victim,
            "seconds": time.monotonic() - started}


def test_a_run_survives_a_killed_worker_and_both_workers_ran_tasks(
        stack: Stack, killed_run: dict[str, Any]) -> None:
    run_id = killed_run["run_id"]
    assert killed_run["state"] == "success", killed_run
    tis = stack.api.task_instances(run_id)
    by_worker: dict[str, set[str]] = {}
    for ti in tis:
        by_worker.setdefault(ti["hostname"], set()).add(ti["task_id"])
    assert by_worker["worker-fetch"] >= {"plan_chunks", "score_chunk.fetch_images",
                                         "score_chunk.join_score", "finalize"}
    assert by_worker[VICTIM] == {"score_chunk.embed_images", "score_chunk.embed_texts"}
    assert {ti["queue"] for ti in tis if ti["task_id"].startswith("score_chunk.embed")} == \
        {"inference"}
    assert max(ti["try_number"] for ti in tis) >= 2  # the killed task ran again
    # Its embed tasks asked the stack's inference-server, which holds the model.
    for endpoint in ("/v1/embed/images", "/v1/embed/texts"):
        assert served_requests(stack, endpoint) > 0, endpoint
    # The killed try's own log ends by saying its worker died (not only the scheduler's log).
    retried = [ti for ti in tis if ti["try_number"] >= 2 and ti["task_id"] in EMBED_TASKS]
    last_lines = [last_log_event(try_log(stack, ti, 1)) for ti in retried]
    assert any("The worker running this try (worker-inference) died" in line
               for line in last_lines), last_lines
    restarted = stack.state()["components"][VICTIM]["pid"]
    assert restarted != killed_run["victim"]
    log = (stack.home / "logs" / "stack.log").read_text()
    assert f"{VICTIM} exited (-9); restarting it" in log
    print(f"2,000 rows through the stack with a killed worker: {killed_run['seconds']:.0f} s")


def try_log(stack: Stack, ti: dict[str, Any], attempt: int) -> Path:
    mapped = f"map_index={ti['map_index']}/" if ti["map_index"] >= 0 else ""
    return (stack.home / "logs" / f"dag_id={ti['dag_id']}" / f"run_id={ti['dag_run_id']}"
            / f"task_id={ti['task_id']}" / mapped / f"attempt={attempt}.log")


def last_log_event(path: Path) -> str:
    """The last event of a task log (JSON lines), or "" when there is none."""
    lines = path.read_text().splitlines() if path.exists() else []
    return str(json.loads(lines[-1])["event"]) if lines else ""


def served_requests(stack: Stack, endpoint: str) -> float:
    """Successful requests the inference-server answered on ``endpoint`` (its /metrics)."""
    with urllib.request.urlopen(f"{stack.config.inference_url}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    pattern = re.compile(r'^sim_serve_requests_total\{(?=[^}]*endpoint="' + re.escape(endpoint)
                         + r'")(?=[^}]*status="200")[^}]*\} (\S+)$', re.MULTILINE)
    return sum(float(value) for value in pattern.findall(text))


def test_every_input_row_has_exactly_one_results_row(stack: Stack,
                                                     killed_run: dict[str, Any]) -> None:
    rows = score_rows(stack.results_url, killed_run["run_id"])
    assert [r["row_number"] for r in rows] == list(range(ROWS))  # none missing, none twice
    assert all(r["error"] is None for r in rows)
    assert run_status(stack.results_url, killed_run["run_id"])["status"] == "succeeded"
    body = stack.s3().get_object(Bucket=stack.config.bucket, Key="output/scored.csv")["Body"]
    assert body.read().decode("utf-8").count("\n") == ROWS + 1


def test_chunks_run_depth_first_while_the_last_chunk_is_fetched_from_a_slow_host(
        stack: Stack, image_server: ImageServer, tmp_path: Path,
        killed_run: dict[str, Any]) -> None:
    """Four chunks of 100; the last one's images take SLOW_SECONDS each to arrive. Chunk 0 is
    embedded and scored while that fetch still runs: fetch tasks cannot hold the slots the
    inference worker needs, and a chunk's later stages outrank other chunks' fetches."""
    urls = serve_good_images(image_server, 300, prefix="depth")
    body = make_image(seed=77)
    urls += [image_server.add(f"/slow/{i}.jpg", Route(body=body, content_type="image/jpeg",
                                                       delay=SLOW_SECONDS)) for i in range(100)]
    source = write_pairs(tmp_path / "depth.csv", urls)
    stack.s3().upload_file(str(source), stack.config.bucket, "input/depth.csv")
    run_id = stack.api.trigger({"csv_path": f"s3://{stack.config.bucket}/input/depth.csv",
                                "output_path": f"s3://{stack.config.bucket}/output/depth.csv",
                                "chunk_size": 100})
    assert stack.api.wait_for_run(run_id, timeout=300) == "success"
    ended = {(ti["task_id"], ti["map_index"]): ti["end_date"]
             for ti in stack.api.task_instances(run_id)}
    last_fetch = ended[("score_chunk.fetch_images", 3)]
    assert ended[("score_chunk.join_score", 0)] < last_fetch, ended


def shell_env(stack: Stack, caller_env: dict[str, str]) -> dict[str, str]:
    """A shell after ``eval "$(python -m bin.stack env)"``: the exports, parsed as bash would."""
    exports = stack_command("env", "--home", str(stack.home), env=caller_env, timeout=60)
    done = subprocess.run(["bash", "-c", exports + "\nenv -0"], capture_output=True,
                          env={"PATH": os.environ["PATH"], "HOME": str(stack.home)}, check=True)
    env = dict(entry.split("=", 1) for entry in done.stdout.decode().split("\0") if "=" in entry)
    return {**env, "PYTHONPATH": str(REPO)}


def test_a_shell_reaches_the_stack_with_airflow_and_sim_pipeline(
        stack: Stack, caller_env: dict[str, str], killed_run: dict[str, Any]) -> None:
    env = shell_env(stack, caller_env)
    bin_dir = Path(PYTHON).parent
    runs = subprocess.run([str(bin_dir / "airflow"), "dags", "list-runs", "similarity_scoring",
                           "--output", "json"], env=env, cwd=stack.home, capture_output=True,
                          text=True, timeout=180)
    assert runs.returncode == 0, runs.stderr[-3000:]
    listed = json.loads(next(line for line in runs.stdout.splitlines() if line.startswith("[{")))
    assert killed_run["run_id"] in {run["run_id"] for run in listed}
    results = subprocess.run([str(bin_dir / "sim-pipeline"), "results", "runs"], env=env,
                             cwd=stack.home, capture_output=True, text=True, timeout=120)
    assert results.returncode == 0, results.stderr[-3000:]
    assert killed_run["run_id"] in results.stdout


def test_stack_down_stops_every_process_it_started(stack: Stack,
                                                   caller_env: dict[str, str]) -> None:
    state = stack.state()
    pids = stack_pids(state) | {state["supervisor"]["pid"]}
    assert len(pids) >= len(stack_module.AIRFLOW_COMMANDS) + 2
    stack_command("down", "--home", str(stack.home), env=caller_env, timeout=180)
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert stack_module.read_state(stack.home) is None
    # --purge after a plain down still finds what to drop (config.json).
    stack_command("down", "--home", str(stack.home), "--purge", env=caller_env, timeout=180)
    assert stack_module.read_config(stack.home) is None
    engine = sa.create_engine(stack.config.admin_url)
    try:
        with engine.connect() as conn:
            left = conn.execute(sa.text("SELECT datname FROM pg_database WHERE datname LIKE :n"),
                                {"n": f"{stack.config.name}%"}).scalars().all()
    finally:
        engine.dispose()
    assert left == []
