"""The DAG's per-chunk tasks, each a library stage on one chunk, built once at parse time.

``chunk_task(stage)`` runs the stage in the Airflow worker's process (a TaskFlow task; the library,
and torch, load only when it runs). ``inference_task(stage)`` is where ``SIM_PIPELINE_EXECUTION``
decides how a GPU stage runs: in-process like the others, in the ``gpu`` pool, or with
``kubernetes`` as one pod per chunk (``sim_airflow.pods``, imported only then). Either way the
result is called with the chunk inside the DAG's mapped task group, under the same task id, so the
DAG body does not change. Each mapped instance is labelled by ``labels.chunk_label``. This module
imports ``runs`` and ``pods`` only inside the tasks: neither imports it back.
"""

from __future__ import annotations

from typing import Any, Protocol

from airflow.sdk import task

from sim_airflow.labels import TASKFLOW_LABEL, task_id
from sim_airflow.options import INFERENCE, execution


class ChunkTask(Protocol):
    """What the DAG body needs of a per-chunk task: called with the mapped group's chunk."""

    def __call__(self, *, chunk: Any) -> Any: ...


def chunk_task(stage: str, **task_kwargs: Any) -> ChunkTask:
    """The library stage ``stage`` on one chunk, in the worker's process
    (``runs.run_chunk_stage``)."""

    def run(chunk: dict[str, Any]) -> dict[str, Any]:
        from sim_airflow.runs import run_chunk_stage

        return run_chunk_stage(stage, chunk)

    run.__name__ = run.__qualname__ = task_id(stage)
    run.__doc__ = f"The ``{stage}`` stage on one chunk."
    return task(task_id=task_id(stage), map_index_template=TASKFLOW_LABEL, **task_kwargs)(run)


def inference_task(stage: str) -> ChunkTask:
    """A GPU stage (``embed-images``, ``embed-texts``) in the ``gpu`` pool: in-process, or one
    Kubernetes pod per chunk when ``SIM_PIPELINE_EXECUTION=kubernetes``."""
    if execution() == "kubernetes":
        from sim_airflow.pods import gpu_pod

        return gpu_pod(stage)
    return chunk_task(stage, **INFERENCE)
