"""Airflow plugin: a DAG run of similarity_scoring marked failed by hand fails its scoring run.

Airflow calls no DAG callback when a person sets a run's state (UI or REST API); it calls the
listeners' ``on_dag_run_failed`` in the api-server. Runs that fail on their own are marked by the
DAG's ``on_failure_callback`` (``sim_airflow.status``), so this listener acts only on manual
changes and keeps its database round trip out of the scheduler's loop.
"""

from __future__ import annotations

from typing import Any

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin
from sim_airflow.status import DAG_ID, fail_run

MANUAL = "manually set"  # Airflow's message for a state set through the UI or REST API


class RunStatusListener:
    @hookimpl
    def on_dag_run_failed(self, dag_run: Any, msg: str) -> None:
        if dag_run.dag_id == DAG_ID and MANUAL in (msg or ""):
            fail_run(str(dag_run.run_id))


class SimPipelineStatusPlugin(AirflowPlugin):
    name = "sim_pipeline_status"
    listeners = [RunStatusListener()]
