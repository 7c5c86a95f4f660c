"""The two Celery workers on other hosts: each in its own network and mount namespace.

The stack (``bin.stack up --no-workers``) runs the api-server, scheduler, dag-processor,
triggerer, the model server and SeaweedFS on 127.0.0.1. The fetch worker and the inference
worker each run in a network namespace whose only way out is a veth pair to this machine
(tests/support/netns.py): they reach PostgreSQL, Redis, SeaweedFS, the api-server, the model
server and the image server only at the host's end of their veth, through forwarders, never at
127.0.0.1 (their own loopback holds nothing). Their /tmp and the checkout's ``.sim-pipeline/``
are empty tmpfs, so the scheduler's files, the stack's folder and the model's folder are out of
sight: input and output travel as s3://, chunks as XCom, and only the model server holds the
tiny random-weight model (its scores mean nothing). The run's rows equal the CLI's, which is
what docs/deployment.md ("Workers on other hosts") states each host needs.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bin import stack as stack_module
from bin.airflow_api import AirflowApi
from tests.airflow_helpers import PYTHON, REPO, free_port, run_status, write_pairs
from tests.conftest import ImageServer
from tests.pairs import serve_good_images
from tests.support.netns import Namespace
from tests.test_airflow_stack import Stack, stack_command

ROWS = 200
CHUNK_SIZE = 100  # two chunks (the DAG's smallest)
WORKERS = tuple(stack_module.WORKER_QUEUES)  # worker-fetch, worker-inference
PER_RUN_COLUMNS = ("run_id", "scored_at")


@pytest.fixture(scope="module")
def remote_env(tiny_model: Path, image_server: ImageServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "SIM_PIPELINE_", "AWS_", "_AIRFLOW"))}
    env.update(SIM_PIPELINE_MODEL=str(tiny_model), SIM_PIPELINE_DEVICE="cpu",
               SIM_PIPELINE_BATCH_SIZE="16", SIM_PIPELINE_FETCH_TIMEOUT="5",
               SIM_PIPELINE_ALLOW_HOSTS=image_server.allow_hosts, HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO))
    return env


@pytest.fixture(scope="module")
def workerless_stack(tmp_path_factory: pytest.TempPathFactory, pg_admin_url: str,
                     remote_env: dict[str, str]) -> Iterator[Stack]:
    """A stack with every component but the workers (its own module: it goes down after)."""
    home, port = tmp_path_factory.mktemp(f"remote-{uuid.uuid4().hex[:6]}"), free_port()
    try:
        printed = stack_command("up", "--home", str(home), "--port", str(port), "--postgres",
                                pg_admin_url, "--no-workers", env=remote_env, timeout=300)
        assert "no workers here" in printed
        config = stack_module.read_config(home)
        assert config is not None and not config.workers
        live = Stack(home, AirflowApi(port), config)
        live.api.wait(live.api.has_dag, "the dag-processor to parse the DAG", 90)
        yield live
    finally:
        if stack_module.read_config(home) is not None:
            stack_command("down", "--home", str(home), "--purge", env=remote_env, timeout=180)


def server_ports(stack: Stack, image_server: ImageServer) -> list[int]:
    """Every port a worker talks to, each a server on 127.0.0.1."""
    cfg = stack.config
    admin = stack_module.make_url(cfg.admin_url)
    redis_port = stack_module.make_url(stack_module.DEFAULT_REDIS).port or 6379
    return [admin.port or 5432, redis_port, cfg.port, cfg.seaweed_ports["s3"], cfg.model_port,
            image_server.port, image_server.closed_port]


def worker_environment(stack: Stack, base: dict[str, str], name: str,
                       namespace: Namespace) -> dict[str, str]:
    """The stack's environment for the worker ``name``, every 127.0.0.1 replaced by the
    host's address as the namespace sees it, and AIRFLOW_HOME on the worker's own /tmp."""
    env = stack_module.component_environ(stack.config, base, name)
    env = {k: v.replace("127.0.0.1", namespace.host_address) for k, v in env.items()}
    env["AIRFLOW_HOME"] = "/tmp/airflow"
    # The model is on neither host: plan checks it by asking the model server, as embed does.
    env["SIM_PIPELINE_INFERENCE_URL"] = stack.config.inference_url.replace(
        "127.0.0.1", namespace.host_address)
    return env


@pytest.fixture(scope="module")
def remote_workers(workerless_stack: Stack, remote_env: dict[str, str],
                   image_server: ImageServer, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[dict[str, Namespace]]:
    """Each worker in its own namespace; every namespace, veth, forwarder and process is gone
    after, also when a test failed."""
    logs = tmp_path_factory.mktemp("remote-worker-logs")
    hidden = REPO / ".sim-pipeline"
    hidden.mkdir(exist_ok=True)  # the mount point; the workers see it empty
    namespaces: dict[str, Namespace] = {}
    try:
        for name in WORKERS:
            namespace = namespaces[name] = Namespace()
            namespace.forward(*server_ports(workerless_stack, image_server))
            command = [str(Path(PYTHON).parent / "airflow"),
                       *stack_module.airflow_commands(workerless_stack.config.pools)[name]]
            env = worker_environment(workerless_stack, remote_env, name, namespace)
            with (logs / f"{name}.log").open("ab") as log:
                namespace.run(command, env, [hidden], log)
        yield namespaces
    finally:
        for namespace in namespaces.values():
            namespace.close()
        for namespace in namespaces.values():
            listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
            assert namespace.name not in listed.stdout


def output_rows(text: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in PER_RUN_COLUMNS}
            for row in csv.DictReader(io.StringIO(text))]


def test_workers_in_their_own_namespaces_score_like_the_cli(
        workerless_stack: Stack, remote_workers: dict[str, Namespace],
        image_server: ImageServer, remote_env: dict[str, str], tmp_path: Path) -> None:
    fetch_ns = remote_workers["worker-fetch"]
    urls = serve_good_images(image_server, ROWS, prefix="remote")
    # The images as the fetch worker reaches them: at its veth's host end.
    urls = [u.replace("127.0.0.1", fetch_ns.host_address) for u in urls]
    source = write_pairs(tmp_path / "pairs.csv", urls)
    stack = workerless_stack
    bucket = stack.config.bucket
    stack.s3().upload_file(str(source), bucket, "input/remote.csv")
    run_id = stack.api.trigger({"csv_path": f"s3://{bucket}/input/remote.csv",
                                "output_path": f"s3://{bucket}/output/remote.csv",
                                "chunk_size": CHUNK_SIZE})
    assert stack.api.wait_for_run(run_id, timeout=300) == "success"
    tis = stack.api.task_instances(run_id)
    by_worker: dict[str, set[str]] = {}
    for ti in tis:
        by_worker.setdefault(ti["hostname"], set()).add(ti["task_id"])
    assert by_worker == {
        "worker-fetch": {"plan_chunks", "score_chunk.fetch_images", "score_chunk.join_score",
                         "finalize"},
        "worker-inference": {"score_chunk.embed_images", "score_chunk.embed_texts"}}
    assert max(ti["map_index"] for ti in tis) == 1  # two chunks
    assert run_status(stack.results_url, run_id)["status"] == "succeeded"
    scored = stack.s3().get_object(Bucket=bucket, Key="output/remote.csv")["Body"].read()

    # The CLI on this host, same input, same model, its own store and database.
    allow = remote_env["SIM_PIPELINE_ALLOW_HOSTS"].replace("127.0.0.1", fetch_ns.host_address)
    cli_out = tmp_path / "cli.csv"
    done = subprocess.run(
        [str(Path(PYTHON).parent / "sim-pipeline"), "score", str(source), "-o", str(cli_out),
         "--store", str(tmp_path / "store"), "--database-url",
         f"sqlite:///{tmp_path / 'cli.db'}", "--chunk-size", str(CHUNK_SIZE), "--allow-hosts",
         allow, "-q"], env=remote_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    cli_rows = output_rows(cli_out.read_text(encoding="utf-8"))
    assert len(cli_rows) == ROWS and all(r.get("error") in ("", None) for r in cli_rows)
    assert output_rows(scored.decode("utf-8")) == cli_rows


def test_the_workers_see_neither_the_hosts_files_nor_its_loopback(
        workerless_stack: Stack, remote_workers: dict[str, Namespace],
        remote_env: dict[str, str]) -> None:
    """What the run above relied on: the stack's folder and the model's are out of a worker's
    sight, and the servers on 127.0.0.1 out of its reach."""
    model = remote_env["SIM_PIPELINE_MODEL"]
    pg_port = stack_module.make_url(workerless_stack.config.admin_url).port or 5432
    for namespace in remote_workers.values():
        [worker] = namespace.processes
        assert worker.poll() is None
        root = Path(f"/proc/{worker.pid}/root")  # the worker's view of the file system
        assert (root / str(REPO).lstrip("/") / "dags").is_dir()
        for hidden in (workerless_stack.home, Path(model)):
            assert hidden.exists()
            assert not (root / str(hidden).lstrip("/")).exists(), hidden
        for address in ("127.0.0.1", namespace.host_address):
            probe = subprocess.run(
                ["ip", "netns", "exec", namespace.name, "bash", "-c",
                 f"exec 3<>/dev/tcp/{address}/{pg_port}"], capture_output=True, timeout=30)
            reached = probe.returncode == 0
            assert reached == (address == namespace.host_address), (address, probe.stderr)
