"""The DAG's per-chunk tasks, each a library stage on one chunk, built once at parse time.

``chunk_task(stage)`` runs the stage in the Airflow worker's process (a TaskFlow task; the library,
and torch, load only when it runs). ``inference_task(stage)`` is where ``SIM_PIPELINE_EXECUTION``
decides how a GPU stage runs: in-process like the others, in the ``gpu`` pool, or with
``kubernetes`` as one pod per chunk (``sim_airflow.pods``, imported only then). Either way the
result is called with the chunk inside the DAG's mapped task group, under the same task id, so the
DAG body does not change. Each mapped instance is labelled by ``chunk_label`` ("chunk 3: rows
3000-3999") instead of a bare map index; the label renders from the task's own arguments before
it runs, so a running or failed task shows it too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from airflow.sdk import task

from sim_airflow.options import INFERENCE, execution

# Rendered with the DAG's user_defined_macros (``LABEL_MACROS``); TaskFlow tasks keep their
# keyword arguments in ``op_kwargs`` (so the DAG passes ``chunk=``), pod operators in ``chunk``.
TASKFLOW_LABEL = "{{ chunk_label(task.op_kwargs['chunk']) }}"
POD_LABEL = "{{ chunk_label(task.chunk) }}"


def chunk_label(chunk: Mapping[str, Any]) -> str:
    """``chunk 3: rows 3000-3999``: which rows of the input a mapped task works on (0-based, as
    the results table's ``row_number``)."""
    first = int(chunk["first_row"])
    return f"chunk {chunk['index']}: rows {first}-{first + int(chunk['rows']) - 1}"


LABEL_MACROS = {"chunk_label": chunk_label}


class ChunkTask(Protocol):
    """What the DAG body needs of a per-chunk task: called with the mapped group's chunk."""

    def __call__(self, *, chunk: Any) -> Any: ...


def task_id(stage: str) -> str:
    """The task id of a library stage: ``embed-images`` runs as ``embed_images``."""
    return stage.replace("-", "_")


def chunk_task(stage: str, **task_kwargs: Any) -> ChunkTask:
    """The library stage ``stage`` on one chunk, in the worker's process (``runs.run_stage``)."""

    def run(chunk: dict[str, Any]) -> dict[str, Any]:
        from sim_airflow.runs import run_stage

        return run_stage(stage, chunk)

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
