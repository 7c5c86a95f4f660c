"""``python -m tests.drift_airflow_helper RUNS``: dag.test() runs of the scoring DAG and of
``score_drift``, in the given order, in one process with the test's Airflow home.

Answers (one JSON line, as ``tests.airflow_helpers``) with each run's id, state and task states,
the XCom of each ``score_drift`` run's ``compare`` task, and the events of the scores Asset as
Airflow recorded them.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any

from tests.airflow_helpers import MARKER, REPO


def task_results(dag_id: str, run_id: str) -> dict[str, Any]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.run_id == run_id,
                                                 TaskInstance.dag_id == dag_id).all()
        states = {f"{ti.task_id}[{ti.map_index}]": str(ti.state) for ti in tis}
        xcom = session.query(XComModel).filter(XComModel.run_id == run_id,
                                               XComModel.dag_id == dag_id,
                                               XComModel.task_id == "compare",
                                               XComModel.key == "return_value").first()
        return {"tasks": states,
                "compare": None if xcom is None else XComModel.deserialize_value(xcom)}


def asset_events() -> list[dict[str, Any]]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (session.query(AssetModel.uri, AssetEvent.extra, AssetEvent.source_dag_id,
                              AssetEvent.source_run_id)
                .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
                .order_by(AssetEvent.id).all())
        return [{"uri": uri, "extra": extra, "dag_id": dag_id, "run_id": run_id}
                for uri, extra, dag_id, run_id in rows]


def run_all(runs: list[dict[str, Any]]) -> dict[str, Any]:
    from airflow.dag_processing.dagbag import DagBag

    done = []
    for run in runs:
        dag = DagBag(dag_folder=str(REPO / "dags")).dags[run["dag_id"]]
        dag_run = dag.test(run_conf=run.get("conf"),
                           logical_date=datetime.fromisoformat(run["logical_date"]))
        done.append({"dag_id": run["dag_id"], "run_id": dag_run.run_id,
                     "state": str(dag_run.state), **task_results(run["dag_id"], dag_run.run_id)})
    drift = DagBag(dag_folder=str(REPO / "dags")).dags["score_drift"]
    schedule = [asset.uri for asset in drift.timetable.asset_condition.objects]
    return {"runs": done, "asset_events": asset_events(), "drift_schedule": schedule}


if __name__ == "__main__":
    print(MARKER + json.dumps(run_all(json.loads(sys.argv[1])), default=str), flush=True)
