"""Real Airflow 3 for the tests, each step in its own process with an isolated AIRFLOW_HOME.

Airflow reads its configuration once, at import, so the tests never import it themselves: every
Airflow step runs as ``python -m tests.airflow_helpers COMMAND ARGS`` in an environment the test
chose, and answers with one JSON line on stdout. The results are read from PostgreSQL directly.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bin.airflow_api import DAG_ID

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
MARKER = "@@result@@ "


def airflow_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment for one Airflow home: no inherited AIRFLOW_*, SIM_PIPELINE_* or AWS_*."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "SIM_PIPELINE_", "AWS_", "_AIRFLOW"))}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        # SQLite waits up to 60 s for its write lock (the launcher's setting, bin/airflow_local.py)
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}?timeout=60",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",  # the test model is a folder: nothing to ask the Hub
    })
    env.update(extra or {})
    return env


def run_airflow(args: Sequence[str], env: Mapping[str, str], timeout: float = 120) -> str:
    """An ``airflow`` CLI command; its output, or an assertion error that shows it."""
    done = subprocess.run([AIRFLOW, *args], env=dict(env), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"airflow {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def helper(command: str, payload: Any, env: Mapping[str, str], timeout: float = 180) -> Any:
    """Run one command of this module's ``main`` in a fresh process and return its JSON answer."""
    return helper_with_output(command, payload, env, timeout)[0]


def helper_with_output(command: str, payload: Any, env: Mapping[str, str],
                       timeout: float = 180) -> tuple[Any, str]:
    """``helper``, and everything the process printed (task logs, under dag.test)."""
    done = subprocess.run([PYTHON, "-m", "tests.airflow_helpers", command, json.dumps(payload)],
                          env=dict(env), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARKER)]
    assert done.returncode == 0 and lines, \
        f"{command} failed ({done.returncode}):\n{done.stdout[-8000:]}\n{done.stderr[-8000:]}"
    return json.loads(lines[-1][len(MARKER):]), done.stdout + done.stderr


def write_pairs(path: Path, urls: Sequence[str], prefix: str = "a photo") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption"])
        for i, url in enumerate(urls):
            writer.writerow([url, f"{prefix} number {i}"])
    return path


def score_rows(pg_url: str, run_id: str | None = None) -> list[dict[str, Any]]:
    """The results table's rows (one run's, or all), in a stable order."""
    query = "SELECT * FROM similarity_scores"
    if run_id is not None:
        query += " WHERE run_id = :run_id"
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(query + " ORDER BY run_id, row_number"),
                                {"run_id": run_id}).mappings()
            return [dict(r) for r in rows]
    finally:
        engine.dispose()


def run_status(pg_url: str, run_id: str) -> dict[str, Any] | None:
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT * FROM scoring_runs WHERE run_id = :r"),
                               {"r": run_id}).mappings().first()
            return None if row is None else dict(row)
    finally:
        engine.dispose()


def runs_of_source(pg_url: str, source: str) -> list[str]:
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(
                "SELECT run_id FROM scoring_runs WHERE source = :s ORDER BY run_id"),
                {"s": source}).scalars())
    finally:
        engine.dispose()


def without(rows: list[dict[str, Any]], *columns: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in columns} for row in rows]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# What the DAG file may load of sim_pipeline at parse time: the configuration reader and the
# stage graph, nothing that imports a stage.
PARSE_TIME_MODULES = {"sim_pipeline.core", "sim_pipeline.core.config", "sim_pipeline.core.errors",
                      "sim_pipeline.core.layout", "sim_pipeline.stages",
                      "sim_pipeline.stages.registry"}


# ---- commands, run inside the Airflow process -------------------------------------------------

def cmd_dagbag(_: Any) -> dict[str, Any]:
    """Parse the dags folder the way the dag processor does; report time, errors, heavy imports."""
    from airflow.dag_processing.dagbag import DagBag

    started = time.monotonic()
    bag = DagBag(dag_folder=str(REPO / "dags"))
    seconds = time.monotonic() - started
    dag = bag.dags.get(DAG_ID)
    return {
        "seconds": seconds, "import_errors": {k: str(v) for k, v in bag.import_errors.items()},
        "dags": sorted(bag.dags), "heavy_modules": sorted(
            m for m in sys.modules if m in ("torch", "transformers")
            or m.startswith("sim_pipeline.") and m not in PARSE_TIME_MODULES),
        "tasks": {} if dag is None else {t.task_id: {
            "upstream": sorted(t.upstream_task_ids), "pool": t.pool,
            "retries": t.retries, "operator": getattr(t, "operator_class", type(t)).__name__,
            "mapped": t.is_mapped or t.get_closest_mapped_task_group() is not None,
            "map_index_template": t.map_index_template} for t in dag.tasks},
        "schedule": None if dag is None else getattr(dag.timetable, "expression", None),
        "catchup": None if dag is None else dag.catchup,
        "params": {} if dag is None else {k: dag.params.get_param(k).description
                                          for k in dag.params},
    }


def cmd_dag_test(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Parse the DAG (before anything could load torch), then ``dag.test()`` each run in turn:
    no scheduler, no executor, every task in this process so torch loads once."""
    from airflow.dag_processing.dagbag import DagBag

    bag = cmd_dagbag(None)
    results = []
    for run in runs:
        dag = DagBag(dag_folder=str(REPO / "dags")).dags[DAG_ID]  # fresh params for each run
        logical_date = run.get("logical_date")
        dag_run = dag.test(run_conf=run.get("conf"), logical_date=(
            datetime.fromisoformat(logical_date) if logical_date else None))
        results.append({"run_id": dag_run.run_id, "state": str(dag_run.state),
                        "tasks": task_states(dag_run.run_id)})
    return {"bag": bag, "runs": results}


def task_states(run_id: str) -> list[tuple[str, int, str, int, str | None]]:
    """(task id, map index, state, try number, the map index's label) of each task instance."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.run_id == run_id,
                                                 TaskInstance.dag_id == DAG_ID).all()
        return sorted((ti.task_id, ti.map_index, str(ti.state), ti.try_number,
                       ti.rendered_map_index) for ti in tis)


def cmd_params(confs: list[dict[str, Any]]) -> list[str | None]:
    """Validate each conf against the trigger form, as a trigger would: the error, or None."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import ParamValidationError

    errors: list[str | None] = []
    for conf in confs:
        params = DagBag(dag_folder=str(REPO / "dags")).dags[DAG_ID].params
        try:
            params.update(conf)  # each value is checked against its Param's schema
            params.validate()
            errors.append(None)
        except (ParamValidationError, ValueError) as error:
            errors.append(str(error))
    return errors


def cmd_pod(payload: dict[str, Any]) -> dict[str, Any]:
    """The DAG as parsed in this environment, and the GPU pod one chunk would get, rendered
    without a cluster by ``build_pod_request_obj(dry_run=True)``."""
    bag = cmd_dagbag(None)
    from kubernetes.client import ApiClient
    from sim_airflow.pods import StagePodOperator, gpu_pod

    stage = gpu_pod(payload["stage"])
    operator = StagePodOperator(task_id=stage.task_id, stage=stage.stage, chunk=payload["chunk"],
                                model=payload.get("model"), **stage.settings.operator_kwargs())
    pod = operator.build_pod_request_obj(dry_run=True)
    return {"bag": bag, "pod": ApiClient().sanitize_for_serialization(pod)}


COMMANDS = {"dagbag": cmd_dagbag, "dag-test": cmd_dag_test, "pod": cmd_pod,
            "params": cmd_params}


def main(argv: Sequence[str]) -> None:
    command, payload = argv[0], json.loads(argv[1]) if len(argv) > 1 else None
    result = COMMANDS[command](payload)
    print(MARKER + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
