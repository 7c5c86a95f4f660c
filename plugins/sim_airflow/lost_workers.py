"""The last line of a try whose worker died: said in the try's own log, not only the scheduler's.

When a worker dies (SIGKILL, a lost host), its running try stops heartbeating; after
``[scheduler] task_instance_heartbeat_timeout`` the scheduler fails it, which frees its pool slot,
and asks the dag-processor to run the task's retry or failure callback. The try's log just stops
where the worker died, so that callback, ``note_lost_worker``, appends one sentence to it saying
so. Inside a try's own process (a task that failed on its own) it does nothing: that log already
ends with the task's own reason. It assumes Airflow's default ``log_filename_template`` and a log
folder the dag-processor shares with the workers (one machine under ``make stack``, a shared
volume under Compose).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

OWN_FAILURE = "Task failed with exception"  # what a try that failed in its own process logs


def try_log(context: Mapping[str, Any]) -> Path:
    """The try's log file under ``[logging] base_log_folder`` (the default file name template)."""
    from airflow.sdk.configuration import conf

    ti = context["ti"]
    mapped = f"map_index={ti.map_index}/" if ti.map_index is not None and ti.map_index >= 0 else ""
    return (Path(conf.get("logging", "base_log_folder")) / f"dag_id={ti.dag_id}"
            / f"run_id={ti.run_id}" / f"task_id={ti.task_id}" / mapped
            / f"attempt={ti.try_number}.log")


def lost_worker_sentence(context: Mapping[str, Any]) -> str:
    ti = context["ti"]
    host = getattr(ti, "hostname", None) or "its worker"
    return (f"The worker running this try ({host}) died or lost contact: the try stopped "
            "sending heartbeats, so the scheduler failed it and freed its slot"
            + ("; it will be retried." if ti.try_number <= (ti.max_tries or 0) else "."))


def note_lost_worker(context: Mapping[str, Any]) -> None:
    """The task's retry and failure callback: append the lost-worker sentence to the try's log
    when it is called outside the try's process and the log does not end with its own reason."""
    if os.environ.get("AIRFLOW_CTX_TASK_ID"):  # inside the try: it fails and logs on its own
        return
    path = try_log(context)
    if not path.is_file() or OWN_FAILURE in path.read_text(errors="replace"):
        return
    line = {"timestamp": datetime.now(UTC).isoformat(), "level": "error",
            "event": lost_worker_sentence(context), "logger": "sim_airflow.lost_workers"}
    with path.open("a", encoding="utf-8") as log:
        log.write(json.dumps(line) + "\n")
