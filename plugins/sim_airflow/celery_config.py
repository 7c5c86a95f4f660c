"""The Celery workers' configuration (``[celery] celery_config_options``): Airflow's own, plus the
library modules every task imports, imported once by each worker at its start.

A Celery worker runs each task in a process forked from one of its pool processes, which are
forked from the worker itself; modules the worker imported at start are already loaded in every
task's process. Without this each of a run's tasks imports ``sim_pipeline.runners.dispatch`` and
its dependencies (SQLAlchemy's ORM layer, pyarrow, numpy, httpx: about half a CPU-second) again,
which with chunks of a few hundred rows is a fair part of the task. ``PRELOADED`` holds nothing
that loads torch or a model: forking after torch has started its threads is unsafe, and the
inference worker's tasks ask the model server anyway.

Kept importable without the library, so the scheduler, which reads the same setting to send
tasks, pays nothing: Celery imports ``imports`` in workers only.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG

# What a task's process imports on its way to the stage: the task glue, the runner, each stage.
PRELOADED = (
    "sim_airflow.runs",
    "sim_pipeline.runners.dispatch",
    "sim_pipeline.stages.fetch.chunk",
    "sim_pipeline.stages.embed.images",
    "sim_pipeline.stages.embed.texts",
    "sim_pipeline.stages.score",
    "sim_pipeline.stages.finalize",
)

CELERY_CONFIG: dict[str, Any] = {**DEFAULT_CELERY_CONFIG, "imports": PRELOADED}
