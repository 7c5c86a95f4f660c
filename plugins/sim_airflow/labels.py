"""How a mapped chunk task is named and labelled in the UI; shared by TaskFlow tasks and pods.

Each mapped instance is labelled by ``chunk_label`` ("chunk 3: rows 3000-3999") instead of a bare
map index; the label renders from the task's own arguments before it runs, so a running or failed
task shows it too. Free of imports, so every module of the glue may use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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


def task_id(stage: str) -> str:
    """The task id of a library stage: ``embed-images`` runs as ``embed_images``."""
    return stage.replace("-", "_")
