#!/usr/bin/env python3
"""The production topology of the DAG, natively on this machine, every listener on 127.0.0.1.

    make stack            # or: .venv/bin/python -m bin.stack up [--port 8080]
    eval "$(.venv/bin/python -m bin.stack env)"   # then `airflow ...`, `sim-pipeline results ...`
    make stack-down       # or: .venv/bin/python -m bin.stack down [--purge]

What docker-compose.yaml runs as containers, service for service (``SERVICES``): PostgreSQL
databases for Airflow's metadata and for the results (created in the server at
``--postgres``, default 127.0.0.1:5432), Redis as the Celery broker (the server at 127.0.0.1:6379),
SeaweedFS as the S3 store with its bucket, and Airflow 3 with the CeleryExecutor: api-server,
scheduler, dag-processor, triggerer and two workers on separate queues, ``fetch`` (plan, fetch,
join-score, finalize: network and CPU work) and ``inference`` (embed-images, embed-texts), so a GPU
host subscribes to ``inference`` only. Beside the inference worker, ``inference-server`` (``sim-
pipeline serve`` on 127.0.0.1) holds the model for as long as the stack runs: the embed tasks are
its clients (``SIM_PIPELINE_INFERENCE_URL``) and load no model. The worker's concurrency, the
pools and the executor's parallelism all come from plugins/sim_airflow/pools.py. The Connections
(``sim_pipeline_results``, ``sim_pipeline_store``) are ``AIRFLOW_CONN_*`` variables of every
component; the pools are created by ``up``.

The stack's names are kept in its folder (``config.json``): the databases are
``<name>_airflow`` and ``<name>_results``, with ``name`` derived from the folder's path
(``sim_stack_<8 hex>``), and its Redis database is the first empty one at the first ``up`` and
the same one after; ``up`` prints them, and ``env`` emits the exports under which ``airflow ...``
and ``sim-pipeline results ...`` talk to this stack.

``up --no-workers`` starts no worker: they run on other hosts (docs/deployment.md).

``up`` starts a detached supervisor (``supervise``) and returns once the UI answers. Like
Compose's ``restart: always``, the supervisor restarts any component that dies, killing first
whatever the dead one left in its process group: a SIGKILLed worker's queue is consumed again
within seconds, and the task it was running is failed by the scheduler's heartbeat check and
retried (``SIM_PIPELINE_RETRY_DELAY_SECONDS``). ``down`` stops the supervisor, which stops the
scheduler first and then everything else; what is still alive is killed by the PIDs recorded in
the state file, and nothing else is touched. ``--purge`` also drops the two databases, empties the
Redis database and removes SeaweedFS's data, also after a plain ``down``.

``stack_environment`` is the one definition of the components' environment: docker-compose.yaml
carries the same names (tests/test_compose.py checks it). No login: every visitor is an admin.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bin.airflow_local import loopback_airflow, pools_file, port_is_free, wait_for_api
from plugins.sim_airflow.pools import (
    FETCH_QUEUE,
    INFERENCE_QUEUE,
    SLOTS,
    Pool,
    queue_concurrency,
    sized,
)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
AIRFLOW = str(BIN / "airflow")
SIM_PIPELINE = str(BIN / "sim-pipeline")

DEFAULT_HOME = REPO / ".sim-pipeline" / "stack"
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379"
DEFAULT_MODEL = "openai/clip-vit-base-patch32"
ACCESS_KEY, SECRET_KEY = "sim-pipeline-stack", "sim-pipeline-stack-secret"
# Fixed secrets every component shares (loopback only; docker-compose.yaml takes them from .env).
JWT_SECRET = "sim-pipeline-stack-jwt-secret-for-loopback-only-set-your-own-in-env-0123456789"
FERNET_KEY = "gW7mHqlX6sW0q6dOAnrZk1pnLJeFqg1Ruq3xwXHXZ0c="
# Compose service -> the queue its Celery worker consumes.
WORKER_QUEUES = {"worker-fetch": FETCH_QUEUE, "worker-inference": INFERENCE_QUEUE}
INFERENCE_WORKER = "worker-inference"
# ``sim-pipeline serve`` beside the inference worker: it holds the model, the embed tasks ask it.
MODEL_SERVER = "inference-server"


def airflow_commands(pools: dict[str, Pool] | None = None) -> dict[str, list[str]]:
    """Compose service -> the ``airflow`` command this stack runs for it; each worker's
    concurrency is the slots of its queue's pools."""
    concurrency = queue_concurrency(pools or SLOTS)
    return {
        "api-server": ["api-server"],  # host and port come from AIRFLOW__API__HOST / __PORT
        # No log servers: Airflow binds them to 0.0.0.0; the api-server reads this machine's logs.
        "scheduler": ["scheduler", "--skip-serve-logs"],
        "dag-processor": ["dag-processor"],
        "triggerer": ["triggerer", "--skip-serve-logs"],
        **{name: ["celery", "worker", "--queues", queue, "--concurrency",
                  str(concurrency[queue]), "--skip-serve-logs", "--without-mingle",
                  "--without-gossip", "--celery-hostname", f"{name}@%h"]
           for name, queue in WORKER_QUEUES.items()},
    }


AIRFLOW_COMMANDS = airflow_commands()
# Every service of docker-compose.yaml: the servers, the one-shot init, the Airflow components
# and the model server.
SERVICES = ("postgres", "redis", "seaweedfs", "airflow-init", *AIRFLOW_COMMANDS, MODEL_SERVER)
STOP_ORDER = ("scheduler", "triggerer", *WORKER_QUEUES, MODEL_SERVER, "dag-processor",
              "api-server", "seaweedfs")
SEAWEED_PARTS = ("master", "volume", "filer", "s3", "admin")
GRPC_OFFSET = 10_000


@dataclass
class StackConfig:
    """What one stack is made of; written to the state file so ``down`` finds it again."""

    home: str
    port: int
    admin_url: str
    redis_db: int
    name: str = "sim_stack"  # the databases are <name>_airflow and <name>_results
    bucket: str = "sim-pipeline"
    seaweed_ports: dict[str, int] = field(default_factory=dict)
    model_port: int = 0  # the inference-server's
    gpu_slots: int | None = None  # the gpu pool's size, if not pools.py's
    workers: bool = True  # False: the workers run elsewhere (docs/deployment.md)

    @property
    def pools(self) -> dict[str, Pool]:
        return sized(self.gpu_slots)

    def database_url(self, name: str, driver: str = "postgresql") -> str:
        """A database of the stack's server, as ``driver`` wants it named."""
        url = make_url(self.admin_url)
        return url.set(drivername=driver, database=name).render_as_string(hide_password=False)

    @property
    def airflow_db(self) -> str:
        return f"{self.name}_airflow"

    @property
    def results_db(self) -> str:
        return f"{self.name}_results"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.seaweed_ports['s3']}"

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.model_port}"

    @property
    def broker_url(self) -> str:
        return f"{DEFAULT_REDIS}/{self.redis_db}"


def make_url(url: str) -> Any:
    import sqlalchemy as sa

    return sa.make_url(url)


def stack_environment(cfg: StackConfig, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of every Airflow component; docker-compose.yaml uses the same names.

    Short heartbeat and queue timeouts so a task whose worker was killed is failed and retried
    within a minute or two instead of Airflow's default five (heartbeat) and ten (queued)
    minutes: a killed worker's running tasks stop heartbeating, and the ones it had reserved
    stay unacknowledged in Redis until the queued timeout sends them again. ``speed_settings``
    cut what each task costs Airflow.
    """
    url = make_url(cfg.database_url(cfg.results_db))
    results = {"conn_type": "postgres", "host": url.host, "port": url.port,
               "login": url.username, "password": url.password, "schema": url.database}
    store = {"conn_type": "aws", "login": ACCESS_KEY, "password": SECRET_KEY,
             "extra": {"endpoint_url": cfg.s3_endpoint, "region_name": "us-east-1"}}
    return {
        "AIRFLOW_HOME": cfg.home,
        # PARALLELISM is the workers' slots (pools.py): no task waits long in a Celery queue.
        **loopback_airflow(cfg.port, "CeleryExecutor", cfg.gpu_slots),
        "AIRFLOW__CORE__FERNET_KEY": FERNET_KEY,
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "sim_airflow.options.worker_hostname",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(cfg.port),
        "AIRFLOW__API_AUTH__JWT_SECRET": JWT_SECRET,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": cfg.database_url(cfg.airflow_db,
                                                                "postgresql+psycopg2"),
        "AIRFLOW__CELERY__BROKER_URL": cfg.broker_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + cfg.database_url(cfg.airflow_db),
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": FETCH_QUEUE,
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "90",
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL": "15",
        **speed_settings(),
        "AIRFLOW_CONN_SIM_PIPELINE_RESULTS": json.dumps(results),
        "AIRFLOW_CONN_SIM_PIPELINE_STORE": json.dumps(store),
        # The connection's database, for `sim-pipeline results ...` in the same environment.
        "SIM_PIPELINE_DATABASE_URL": cfg.database_url(cfg.results_db),
        "SIM_PIPELINE_STORE": f"s3://{cfg.bucket}/store",
        "SIM_PIPELINE_MODEL": base.get("SIM_PIPELINE_MODEL") or DEFAULT_MODEL,
        "SIM_PIPELINE_INFERENCE_QUEUE": INFERENCE_QUEUE,
        "SIM_PIPELINE_RETRY_DELAY_SECONDS": base.get("SIM_PIPELINE_RETRY_DELAY_SECONDS") or "5",
        "SIM_PIPELINE_SCHEDULE": schedule(base),
    }


def speed_settings() -> dict[str, str]:
    """What each task costs Airflow, cut (measured with ``bench/airflow.py``'s timeline; see
    docs/performance.md).

    - ``MIN_HEARTBEAT_INTERVAL`` 1 s (default 5): a task's supervisor waits in ``select`` for
      up to this long between checks of its task process, and when the process's sockets close
      just before it exits, the last wait runs out in full: 33 of 82 tasks held their worker
      slot 5 s past their end. Costs one heartbeat request a second per running task.
    - ``CELERY_CONFIG_OPTIONS``: the workers import the library once, at start
      (``sim_airflow.celery_config``), so no task process imports it again.
    - ``MIN_FILE_PROCESS_INTERVAL`` 120 s (default 30): the dag-processor re-parses the DAG
      files less often while runs use the CPUs; a changed DAG file shows within two minutes.
    """
    return {
        "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
        "AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS": "sim_airflow.celery_config.CELERY_CONFIG",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "120",
    }


def schedule(base: Mapping[str, str]) -> str:
    """The DAG's schedule on this stack: manual runs only unless the caller sets one."""
    return base.get("SIM_PIPELINE_SCHEDULE") or "none"


def s3_environment(cfg: StackConfig) -> dict[str, str]:
    """boto3's variables for a library process (the CLI, the model server) on the stack's S3."""
    return {"AWS_ENDPOINT_URL": cfg.s3_endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}


def component_environ(cfg: StackConfig, base: Mapping[str, str], name: str) -> dict[str, str]:
    """The caller's environment (its other SIM_PIPELINE_* settings too), without AWS or Airflow
    settings that would point elsewhere, plus the stack's; each worker names itself."""
    env = {k: v for k, v in base.items() if not k.startswith(("AIRFLOW", "AWS_"))}
    env.update(stack_environment(cfg, base))
    env.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
               AWS_EC2_METADATA_DISABLED="true")
    if name in WORKER_QUEUES:
        env["SIM_PIPELINE_WORKER_NAME"] = name
    if name == INFERENCE_WORKER:
        env["SIM_PIPELINE_INFERENCE_URL"] = cfg.inference_url
    if name in (MODEL_SERVER, "cli"):
        env.update(s3_environment(cfg))
    return env


# ---- the servers: PostgreSQL databases, a Redis database, SeaweedFS --------------------------

def create_databases(cfg: StackConfig) -> None:
    """The metadata and results databases, if missing (kept between ups, like a volume)."""
    import sqlalchemy as sa

    engine = sa.create_engine(cfg.admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for name in (cfg.airflow_db, cfg.results_db):
                exists = conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                      {"n": name}).first()
                if not exists:
                    conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()


def drop_databases(cfg: StackConfig) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(cfg.admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for name in (cfg.airflow_db, cfg.results_db):
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


def stack_name(home: Path) -> str:
    """``sim_stack_<8 hex>``: the database prefix of the stack kept in ``home`` (one per
    checkout), the same at every ``up``."""
    return f"sim_stack_{hashlib.sha256(str(home).encode()).hexdigest()[:8]}"


def empty_redis_db() -> int:
    """The first Redis database number (1-15) holding no keys: the broker shares no queue.
    Picked at the first ``up`` and kept in ``config.json`` after."""
    import redis

    for number in range(1, 16):
        if redis.Redis.from_url(f"{DEFAULT_REDIS}/{number}").dbsize() == 0:
            return number
    raise SystemExit("Every Redis database 1-15 at 127.0.0.1:6379 holds keys; free one.")


def free_seaweed_ports() -> dict[str, int]:
    """A loopback port per SeaweedFS part whose gRPC twin (+10000) is free too."""
    ports: list[int] = []
    while len(ports) < len(SEAWEED_PARTS):
        port = random.randint(20_000, 45_535)
        if port not in ports and port_is_free(port) and port_is_free(port + GRPC_OFFSET):
            ports.append(port)
    return dict(zip(SEAWEED_PARTS, ports, strict=True))


def free_port() -> int:
    """A free loopback port, as the kernel hands it out."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


def model_server_command(cfg: StackConfig) -> list[str]:
    """``sim-pipeline serve`` on loopback: no API key needed, nothing beyond this machine."""
    return [SIM_PIPELINE, "serve", "--host", "127.0.0.1", "--port", str(cfg.model_port),
            "--drain-seconds", "5"]


def wait_for_model_server(cfg: StackConfig, timeout: float = 300) -> None:
    """Until the model server has loaded the model (``/readyz``)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{cfg.inference_url}/readyz", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise RuntimeError(f"the inference server did not load its model in {timeout:.0f} s; see "
                       f"{Path(cfg.home) / 'logs' / (MODEL_SERVER + '.log')}")


def seaweed_command(cfg: StackConfig) -> list[str]:
    """``weed mini`` as tests/seaweed.py runs it: bound to 127.0.0.1, every port pinned, no
    telemetry, its sockets in its data folder."""
    data = Path(cfg.home) / "seaweedfs"
    args = [str(BIN / "weed"), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-s3.autoCreateBucket=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false",
            f"-admin.dataDir={data / 'admin'}", f"-filer.localSocket={data / 'filer.sock'}",
            f"-s3.localSocket={data / 's3.sock'}"]
    for name, port in cfg.seaweed_ports.items():
        args += [f"-{name}.port={port}", f"-{name}.port.grpc={port + GRPC_OFFSET}"]
    return args


def create_bucket(cfg: StackConfig, weed: subprocess.Popen[bytes], timeout: float = 180) -> bool:
    """Wait for SeaweedFS's S3 API, then create the bucket (already there after a restart).
    False when ``weed`` exits first: a port picked as free was taken before it bound it."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client("s3", endpoint_url=cfg.s3_endpoint, region_name="us-east-1",
                          aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                          config=Config(connect_timeout=1, retries={"max_attempts": 1}))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=cfg.bucket)
            return True
        except (BotoCoreError, ClientError):
            if weed.poll() is not None:
                return False
            if time.monotonic() > deadline:
                raise SystemExit(f"SeaweedFS's S3 API at {cfg.s3_endpoint} did not answer in "
                                 f"{timeout:.0f} s; see {cfg.home}/logs/seaweedfs.log.") from None
            time.sleep(0.5)


# ---- processes --------------------------------------------------------------------------------

def start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (/proc/PID/stat field 22): a recorded PID is ours only
    while it matches, so a reused PID is never signalled."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def launch(cfg: StackConfig, name: str, base: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """One component in its own session (so its whole process group can be stopped), its
    output appended to logs/<name>.log."""
    if name == "seaweedfs":
        env = {k: v for k, v in base.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
        command = seaweed_command(cfg)
    elif name == MODEL_SERVER:
        env, command = component_environ(cfg, base, name), model_server_command(cfg)
    else:
        command = [AIRFLOW, *airflow_commands(cfg.pools)[name]]
        env = component_environ(cfg, base, name)
    with (Path(cfg.home) / "logs" / f"{name}.log").open("ab") as log:
        return subprocess.Popen(command, env=env, cwd=cfg.home, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def prepare(cfg: StackConfig, base: Mapping[str, str]) -> None:
    """Databases, Airflow's schema and the pools (all idempotent: a second up keeps the runs)."""
    create_databases(cfg)
    env = component_environ(cfg, base, "airflow-init")
    pools = pools_file(Path(cfg.home), cfg.gpu_slots)
    for args in (["db", "migrate"], ["pools", "import", str(pools)]):
        subprocess.run([AIRFLOW, *args], env=env, cwd=cfg.home, check=True,
                       stdout=subprocess.DEVNULL)


class Supervisor:
    """Starts the components, restarts any that dies, and stops them all on SIGTERM."""

    def __init__(self, cfg: StackConfig, base: Mapping[str, str]) -> None:
        self.cfg, self.base = cfg, base
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = False

    def start(self, name: str) -> None:
        self.processes[name] = launch(self.cfg, name, self.base)
        self.record()

    def record(self) -> None:
        """The state file ``down`` reads: the config, this supervisor, each component's PID."""
        pids = {n: {"pid": p.pid, "start": start_time(p.pid)} for n, p in self.processes.items()}
        state = {"config": asdict(self.cfg), "supervisor": {"pid": os.getpid(),
                                                            "start": start_time(os.getpid())},
                 "components": pids}
        path = state_path(Path(self.cfg.home))
        path.with_suffix(".tmp").write_text(json.dumps(state, indent=2))
        path.with_suffix(".tmp").replace(path)

    def start_seaweedfs(self, attempts: int = 3) -> None:
        """SeaweedFS and its bucket; on fresh ports when it exits at start (on a busy machine,
        a port found free can be taken before it binds it)."""
        for _ in range(attempts):
            self.start("seaweedfs")
            if create_bucket(self.cfg, self.processes["seaweedfs"]):
                return
            self.cfg.seaweed_ports.update(free_seaweed_ports())
        raise SystemExit(f"SeaweedFS exited at start {attempts} times; see "
                         f"{self.cfg.home}/logs/seaweedfs.log.")

    def run(self) -> int:
        self.start_seaweedfs()
        prepare(self.cfg, self.base)
        self.start(MODEL_SERVER)
        for name in AIRFLOW_COMMANDS:
            if self.cfg.workers or name not in WORKER_QUEUES:
                self.start(name)
        wait_for_api(self.cfg.port, {}, timeout=180)  # no processes: it only waits for the UI
        wait_for_model_server(self.cfg)
        (Path(self.cfg.home) / "ready").write_text("ready\n")
        print(f"stack is up: http://127.0.0.1:{self.cfg.port}", flush=True)
        while not self.stopping:
            for name, process in list(self.processes.items()):
                if process.poll() is not None and not self.stopping:
                    print(f"{name} exited ({process.returncode}); restarting it", flush=True)
                    kill_group(process.pid, signal.SIGKILL)  # what it left behind
                    self.start(name)
            time.sleep(1)
        self.stop()
        return 0

    def stop(self, grace: float = 30) -> None:
        """SIGTERM in ``STOP_ORDER`` (the scheduler first, so nothing new starts), then SIGKILL
        to each component's process group."""
        for name in STOP_ORDER:
            process = self.processes.get(name)
            if process is None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop in {grace:.0f} s; killing it", flush=True)
            kill_group(process.pid, signal.SIGKILL)
            process.wait()
            print(f"stopped {name}", flush=True)
        for name, port in self.cfg.seaweed_ports.items():
            Path(f"/tmp/seaweedfs-{name}-grpc-{port + GRPC_OFFSET}.sock").unlink(missing_ok=True)


def state_path(home: Path) -> Path:
    return home / "state.json"


def read_state(home: Path) -> dict[str, Any] | None:
    path = state_path(home)
    return json.loads(path.read_text()) if path.exists() else None


# ---- commands ---------------------------------------------------------------------------------

def config_path(home: Path) -> Path:
    return home / "config.json"


def read_config(home: Path) -> StackConfig | None:
    """The stack's names and ports as its first ``up`` chose them (kept until ``--purge``)."""
    path = config_path(home)
    return StackConfig(**json.loads(path.read_text())) if path.exists() else None


def stack_config(home: Path, args: argparse.Namespace, base: Mapping[str, str]) -> StackConfig:
    """This ``up``'s config: the names and Redis database of the earlier ones (stable across
    restarts), the port asked for now, fresh ports for the rest."""
    slots = base.get("SIM_STACK_GPU_SLOTS")  # else pools.py's size, as in docker-compose.yaml
    earlier = read_config(home)
    name = args.name or (earlier.name if earlier else stack_name(home))
    redis_db = earlier.redis_db if earlier else empty_redis_db()
    return StackConfig(str(home), args.port, args.postgres, redis_db, name=name,
                       seaweed_ports=free_seaweed_ports(), model_port=free_port(),
                       gpu_slots=int(slots) if slots else None, workers=not args.no_workers)


def describe(cfg: StackConfig, base: Mapping[str, str]) -> str:
    """What ``up`` prints: where everything is, how to reach it from a shell, the schedule."""
    in_force = schedule(base)
    when = ("none: manual runs only (no nightly runs, no backfills); set SIM_PIPELINE_SCHEDULE "
            "before make stack for a cron" if in_force == "none" else f"{in_force!r} (cron)")
    slots = ", ".join(f"{name} {pool.slots}" for name, pool in cfg.pools.items())
    workers = "" if cfg.workers else ", no workers here: start them on their hosts"
    return "\n".join([
        f"Stack is up: http://127.0.0.1:{cfg.port}/dags/similarity_scoring (CeleryExecutor, "
        f"queues fetch + inference{workers}; logs in {Path(cfg.home) / 'logs'}).",
        f"  databases {cfg.airflow_db} (Airflow) and {cfg.results_db} (results) at "
        f"{make_url(cfg.admin_url).render_as_string(hide_password=True)}; broker "
        f"{cfg.broker_url}; S3 {cfg.s3_endpoint}, bucket {cfg.bucket}; model server "
        f"{cfg.inference_url}",
        f"  pools {slots}; schedule {when}",
        '  From a shell: eval "$(.venv/bin/python -m bin.stack env)", then airflow dags trigger '
        "similarity_scoring --conf '{\"csv_path\": ...}' or sim-pipeline results runs.",
        "  Stop it with make stack-down (ARGS=--purge also drops its data)."])


def cmd_up(args: argparse.Namespace) -> int:
    """Start the supervisor detached; return once the UI answers (or say why not)."""
    home = args.home.resolve()
    state = read_state(home)
    if state and start_time(state["supervisor"]["pid"]) == state["supervisor"]["start"]:
        print(f"A stack is already running from {home}; stop it with make stack-down.",
              file=sys.stderr)
        return 2
    if not port_is_free(args.port):
        print(f"Port {args.port} on 127.0.0.1 is in use; pick another with --port "
              "(make stack STACK_PORT=...).", file=sys.stderr)
        return 2
    (home / "logs").mkdir(parents=True, exist_ok=True)
    (home / "ready").unlink(missing_ok=True)
    cfg = stack_config(home, args, os.environ)
    config_path(home).write_text(json.dumps(asdict(cfg)))
    with (home / "logs" / "stack.log").open("ab") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "bin.stack", "supervise", "--home", str(home)], cwd=REPO,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    deadline = time.monotonic() + args.timeout
    while not (home / "ready").exists():
        if supervisor.poll() is not None or time.monotonic() > deadline:
            tail = (home / "logs" / "stack.log").read_text(errors="replace")[-3000:]
            print(f"The stack did not come up; see {home / 'logs'}:\n{tail}", file=sys.stderr)
            stop_stack(home)
            return 1
        time.sleep(0.5)
    print(describe(cfg, os.environ), flush=True)
    return 0


def exports(cfg: StackConfig, base: Mapping[str, str]) -> dict[str, str]:
    """The variables under which ``airflow ...`` and ``sim-pipeline ...`` in a shell talk to the
    stack: its Airflow settings and metadata database, its results database, S3 and store."""
    return {**stack_environment(cfg, base), **s3_environment(cfg)}


def cmd_env(args: argparse.Namespace) -> int:
    """``export NAME=value`` lines for ``eval``: the stack's environment for a shell."""
    cfg = read_config(args.home.resolve())
    if cfg is None:
        print(f"No stack was started from {args.home.resolve()}; run make stack first.",
              file=sys.stderr)
        return 2
    for name, value in exports(cfg, os.environ).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def cmd_supervise(args: argparse.Namespace) -> int:
    home = args.home.resolve()
    cfg = read_config(home)
    assert cfg is not None, "up writes the config before it starts the supervisor"
    supervisor = Supervisor(cfg, dict(os.environ))

    def on_signal(signum: int, _: FrameType | None) -> None:
        supervisor.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return supervisor.run()
    finally:
        if not supervisor.stopping:  # it failed while starting: leave nothing behind
            supervisor.stop(grace=10)


def ours(entry: Mapping[str, Any]) -> bool:
    return entry.get("start") is not None and start_time(entry["pid"]) == entry["start"]


def stop_stack(home: Path, timeout: float = 120) -> list[str]:
    """SIGTERM the supervisor and wait; then SIGKILL the process group of every recorded
    component still alive. Returns the names that had to be killed."""
    state = read_state(home)
    if state is None:
        return []
    if ours(state["supervisor"]):
        os.kill(state["supervisor"]["pid"], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while ours(state["supervisor"]) and time.monotonic() < deadline:
            time.sleep(0.5)
    state = read_state(home) or state  # the supervisor may have restarted a component
    killed = [name for name, entry in state["components"].items() if ours(entry)]
    for name in killed:
        kill_group(state["components"][name]["pid"], signal.SIGKILL)
    if ours(state["supervisor"]):
        kill_group(state["supervisor"]["pid"], signal.SIGKILL)
    state_path(home).unlink(missing_ok=True)
    (home / "ready").unlink(missing_ok=True)
    return killed


def cmd_down(args: argparse.Namespace) -> int:
    """Stop the stack if it runs; with ``--purge`` drop its data too, also after a plain down."""
    home = args.home.resolve()
    state = read_state(home)
    if state is None:
        print(f"No stack is running from {home}.")
    else:
        killed = stop_stack(home)
        if killed:
            print(f"killed {', '.join(killed)} (they did not stop on SIGTERM)", file=sys.stderr)
        print("Stack stopped.", flush=True)
    cfg = read_config(home)
    if args.purge and cfg is not None:
        purge(cfg)
        config_path(home).unlink()
        print(f"Purged: databases {cfg.airflow_db} and {cfg.results_db} dropped, broker "
              f"{cfg.broker_url} emptied, S3 data removed.", flush=True)
    return 0


def purge(cfg: StackConfig) -> None:
    """Drop what ``up`` created in the shared servers, and SeaweedFS's data."""
    import shutil

    import redis

    drop_databases(cfg)
    redis.Redis.from_url(cfg.broker_url).flushdb()
    shutil.rmtree(Path(cfg.home) / "seaweedfs", ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "supervise", "down", "env"):
        sub = commands.add_parser(name)
        sub.add_argument("--home", type=Path, default=DEFAULT_HOME,
                         help="the stack's folder: AIRFLOW_HOME, logs, state (default "
                              ".sim-pipeline/stack)")
    up = commands.choices["up"]
    up.add_argument("--port", type=int, default=8080, help="the api-server's port (UI, REST)")
    up.add_argument("--postgres", default=os.environ.get("SIM_STACK_PG_ADMIN_URL",
                                                         DEFAULT_ADMIN_URL),
                    help="admin URL of the PostgreSQL server to create the databases in")
    up.add_argument("--name", help="database name prefix: <name>_airflow, <name>_results "
                    "(default sim_stack_<8 hex of the folder's path>, kept across ups)")
    up.add_argument("--timeout", type=float, default=240, help="seconds to wait for the UI")
    up.add_argument("--no-workers", action="store_true",
                    help="start no Celery worker: they run on other hosts (docs/deployment.md)")
    commands.choices["down"].add_argument("--purge", action="store_true",
                                          help="also drop the databases and the S3 data")
    args = parser.parse_args(argv)
    commands = {"up": cmd_up, "supervise": cmd_supervise, "down": cmd_down, "env": cmd_env}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
