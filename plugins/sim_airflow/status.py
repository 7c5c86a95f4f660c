"""The results table's run status follows the DAG run's: a failed DAG run is a failed scoring run.

``finalize`` marks a run ``succeeded``; nothing inside a task can mark it ``failed``, since the
task that fails may be killed, or never start. So the DAG's ``on_failure_callback`` (run by the
dag-processor under any executor, in-process under ``dag.test``) marks it when a run fails on its
own, and the listener in ``plugins/sim_pipeline_status.py`` when a person marks a run failed in the
UI or the REST API (Airflow calls no DAG callback then). Both go through the library's
``dispatch.fail``, which leaves runs that never planned alone. The DAG file imports this module at
parse time, so the library is imported only when a run fails.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)
DAG_ID = "similarity_scoring"


def fail_run(run_id: str) -> None:
    """Mark the scoring run of this Airflow run failed in the results database (best effort)."""
    from sim_airflow.settings import task_settings
    from sim_pipeline.runners import dispatch

    dispatch.fail(task_settings({}), run_id)
    log.info("Scoring run %s marked failed in the results database.", run_id)


def record_task_failure(context: Mapping[str, Any]) -> None:
    """Every task's ``on_failure_callback``: inside the failed try (its last one), mark the
    scoring run failed with the task's one sentence, which the DAG's callback then keeps. A try
    whose worker died has no sentence of its own: the DAG's callback marks that run."""
    error = context.get("exception")
    if not os.environ.get("AIRFLOW_CTX_TASK_ID") or error is None:
        return
    from sim_airflow.failures import task_sentence
    from sim_airflow.settings import task_settings
    from sim_pipeline.runners import dispatch

    sentence = task_sentence(error)  # the tasks' own failures are sentences already
    ti = context["ti"]
    chunk = f", chunk {ti.map_index}" if ti.map_index >= 0 else ""
    dispatch.fail(task_settings(context["params"]), str(context["run_id"]),
                  f"{ti.task_id}{chunk}: {sentence}")


def mark_run_failed(context: Mapping[str, Any]) -> None:
    """The DAG's ``on_failure_callback``."""
    fail_run(str(context["dag_run"].run_id))
