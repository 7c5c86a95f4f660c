#!/usr/bin/env python3
"""Run Airflow on this machine with the similarity_scoring DAG, to trigger it from the UI.

    make airflow                      # or: .venv/bin/python -m bin.airflow_local [--port 8080]

Starts the api-server (UI, REST API and the execution API tasks report to), the scheduler
(LocalExecutor) and the dag-processor, all on 127.0.0.1, with a SQLite metadata database in its
own AIRFLOW_HOME (--home, default .sim-pipeline/airflow). It creates the pools the DAG needs,
waits until the UI answers, prints where to go, and keeps running until Ctrl-C or SIGTERM; it then
stops the scheduler first, so no new task starts, and then everything else it started.

There is no login: every visitor is an admin, which is why everything binds to 127.0.0.1 only.
SIM_PIPELINE_STORE and SIM_PIPELINE_DATABASE_URL default to .sim-pipeline/ in this checkout; set
them (or the sim_pipeline_store / sim_pipeline_results connections) to use S3 or PostgreSQL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

from plugins.sim_airflow.pools import parallelism, sized

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
AIRFLOW = str(BIN / "airflow")
STOP_ORDER = (("scheduler",), ("dag-processor", "api-server"))


def pools_file(home: Path, gpu_slots: int | None) -> Path:
    """The DAG's pools (plugins/sim_airflow/pools.py), in ``airflow pools import`` form."""
    path = home / "pools.json"
    path.write_text(json.dumps({name: {"slots": pool.slots, "description": pool.description}
                                for name, pool in sized(gpu_slots).items()}, indent=2))
    return path


def sqlite_url(path: Path) -> str:
    """A SQLite metadata database whose connections wait up to 60 s for the write lock.

    SQLite takes one writer at a time, and Python's default wait for the lock is 5 s, which a
    scheduler, an api-server, a dag-processor and a CLI command writing at once exceed on a busy
    machine ("database is locked"). SQLAlchemy's pysqlite (and aiosqlite) dialect passes the URL's
    ``timeout`` to ``sqlite3.connect``, so the components take turns instead of failing.
    """
    return f"sqlite:///{path}?timeout=60"


def loopback_airflow(port: int, executor: str, gpu_slots: int | None = None) -> dict[str, str]:
    """The Airflow settings this launcher and bin/stack.py share: this repo's DAG and plugins,
    no examples, DAGs unpaused, every visitor an admin, the api-server at 127.0.0.1:``port``,
    parallelism the slots of every pool (plugins/sim_airflow/pools.py)."""
    return {
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": executor,
        "AIRFLOW__CORE__PARALLELISM": str(parallelism(sized(gpu_slots))),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
    }


def airflow_environ(home: Path, port: int, base: Mapping[str, str],
                    gpu_slots: int | None = None) -> dict[str, str]:
    """The environment of every component: this repo's DAG and plugins, local-only settings."""
    env = dict(base)
    env["AIRFLOW_HOME"] = str(home)  # and its own metadata DB, whatever the shell says
    env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = sqlite_url(home / "airflow.db")
    defaults = {
        **loopback_airflow(port, "LocalExecutor", gpu_slots),
        "SIM_PIPELINE_STORE": str(REPO / ".sim-pipeline" / "store"),
        "SIM_PIPELINE_DATABASE_URL": f"sqlite:///{REPO / '.sim-pipeline' / 'results.db'}",
    }
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env


def write_ahead_log(database: Path) -> None:
    """Put the SQLite metadata database in WAL mode (it stays so): readers and the writer no
    longer block each other, only writers take turns. In the default mode, with the scheduler,
    the dag-processor, the api-server and task processes on one file, a REST call on a busy
    machine waited out the whole 60 s lock timeout and answered 500."""
    with contextlib.closing(sqlite3.connect(database, timeout=60)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")


def prepare(home: Path, env: Mapping[str, str], gpu_slots: int | None) -> None:
    """Metadata database and pools; both are idempotent, so a restart keeps earlier runs."""
    home.mkdir(parents=True, exist_ok=True)
    write_ahead_log(home / "airflow.db")
    for args in (["db", "migrate"], ["pools", "import", str(pools_file(home, gpu_slots))]):
        subprocess.run([AIRFLOW, *args], env=dict(env), check=True, stdout=subprocess.DEVNULL)


def start(home: Path, port: int, env: Mapping[str, str]) -> dict[str, subprocess.Popen[bytes]]:
    """Each component in its own session (process group), its output in AIRFLOW_HOME/logs."""
    commands = {"api-server": ["api-server", "--host", "127.0.0.1", "--port", str(port)],
                # No log server: it would bind every interface (Airflow hard-codes it), and the
                # api-server reads task logs from this machine's log folder anyway.
                "scheduler": ["scheduler", "--skip-serve-logs"], "dag-processor": ["dag-processor"]}
    (home / "logs").mkdir(parents=True, exist_ok=True)
    processes = {}
    for name, args in commands.items():
        with (home / "logs" / f"{name}.log").open("ab") as log:
            processes[name] = subprocess.Popen(
                [AIRFLOW, *args], env=dict(env), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
    (home / "pids.json").write_text(json.dumps({n: p.pid for n, p in processes.items()}))
    return processes


def port_is_free(port: int) -> bool:
    """Whether the api-server could bind the port: else "Airflow is up" would be someone else."""
    try:
        socket.create_server(("127.0.0.1", port)).close()
    except OSError:
        return False
    return True


def wait_for_api(port: int, processes: Mapping[str, subprocess.Popen[bytes]],
                 timeout: float = 120) -> None:
    url = f"http://127.0.0.1:{port}/api/v2/monitor/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes.values()):
            raise RuntimeError("an Airflow component exited while starting; see its log")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise RuntimeError(f"the api-server did not answer on port {port} in {timeout:.0f} s")


def stop(processes: Mapping[str, subprocess.Popen[bytes]], grace: float = 30) -> None:
    """The scheduler first, so no new task starts; then the dag-processor and the api-server."""
    for names in STOP_ORDER:
        group = {n: processes[n] for n in names if n in processes}
        started = time.monotonic()
        for process in group.values():
            process.send_signal(signal.SIGTERM)
        for name, process in group.items():
            try:
                process.wait(timeout=max(0.0, grace - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop in {grace:.0f} s; killing it", file=sys.stderr)
            _signal_group(process.pid, signal.SIGKILL)  # anything it left in its process group
            process.wait()
        print(f"stopped {', '.join(group)} in {time.monotonic() - started:.1f} s", flush=True)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--gpu-slots", type=int, metavar="N",
                        help="embedding tasks at once (the gpu pool's size; default 2)")
    # Not $AIRFLOW_HOME: a launcher for trials must not migrate or add pools to another Airflow.
    parser.add_argument("--home", type=Path, default=REPO / ".sim-pipeline" / "airflow",
                        help="AIRFLOW_HOME of this Airflow (default .sim-pipeline/airflow)")
    args = parser.parse_args(argv)
    home = args.home.resolve()
    if not port_is_free(args.port):
        print(f"Port {args.port} on 127.0.0.1 is in use; pick another with --port "
              "(make airflow AIRFLOW_PORT=...).", file=sys.stderr)
        return 2
    env = airflow_environ(home, args.port, os.environ, args.gpu_slots)
    prepare(home, env, args.gpu_slots)
    stopping: list[int] = []

    def on_signal(signum: int, _: FrameType | None) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    processes = start(home, args.port, env)
    try:
        wait_for_api(args.port, processes)
        print(f"Airflow is up: http://127.0.0.1:{args.port}/dags/similarity_scoring "
              f"(logs in {home / 'logs'}); Ctrl-C stops it.", flush=True)
        while not stopping:
            exited = [n for n, p in processes.items() if p.poll() is not None]
            if exited:
                print(f"{', '.join(exited)} exited; stopping the rest", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    finally:
        stop(processes)
        print("Airflow stopped.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
