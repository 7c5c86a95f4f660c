"""similarity_scoring: how well each caption describes its image (CLIP), chunk by chunk.

```
input CSV ──> plan ──┬──> chunk 0: fetch-images ──> embed-images ──┬──> join-score ──┐
                     │             embed-texts ────────────────────┘    (rows upserted │
                     ├──> chunk 1: ...                                   into the      ├──> finalize ──> scored CSV
                     └──> chunk N: ...                                   results table)┘               + report
```

Each chunk is one instance of the mapped task group ``score_chunk`` and flows through its stages
on its own (depth-first): chunk 0 is embedded while chunk 1 is still being fetched, and
``embed_texts`` needs no image, so it starts with the fetch. ``finalize`` waits for every chunk.
Every task runs in a pool of ``sim_airflow.pools``, whose slots are the workers' (fetch tasks
cannot take an inference slot), and a chunk's later stages outrank other chunks' fetches
(``weight_rule="upstream"``), so depth-first holds on the CeleryExecutor too.

Trigger it with ``{"csv_path": "s3://bucket/pairs.csv"}``; nightly runs read the input of their
logical date (``SIM_PIPELINE_NIGHTLY_INPUT``, default ``<store>/incoming/{{ ds }}.csv``) and skip
when it is missing. Tasks pass only chunk descriptors; images and embeddings stay in the object
store, scores land in the results table under the Airflow run id, whose status follows the DAG
run's (a failed run is marked ``failed``). Every stage is the library's
(``sim_pipeline.runners.dispatch``), imported inside the task: parsing reads only the stage graph
(``sim_pipeline.stages.registry``) and never loads torch.
``embed_images`` and ``embed_texts`` run in-process, or as one Kubernetes pod per chunk with
``SIM_PIPELINE_EXECUTION=kubernetes``. The Airflow glue lives in ``plugins/sim_airflow``.
"""

# The docstring's diagram is ARCHITECTURE.md's, character for character, wider than our lines.
# ruff: noqa: E501
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from airflow.sdk import dag, task, task_group
from sim_airflow.assets import OUTLETS
from sim_airflow.labels import LABEL_MACROS
from sim_airflow.lost_workers import note_lost_worker
from sim_airflow.options import CHUNK_WORK, DEPTH_FIRST, FETCH, RETRIES, params, schedule
from sim_airflow.status import mark_run_failed, record_task_failure
from sim_airflow.tasks import chunk_task, inference_task

from sim_pipeline.core.layout import EMBED_IMAGES, EMBED_TEXTS, FETCH_IMAGES, JOIN_SCORE
from sim_pipeline.stages.registry import CHUNK_STAGES

Chunk = dict[str, Any]
Counts = dict[str, Any]


@task(**CHUNK_WORK)
def plan_chunks() -> list[Chunk]:
    from sim_airflow.runs import plan_run

    return plan_run()


CHUNK_TASKS = {FETCH_IMAGES: chunk_task(FETCH_IMAGES, **FETCH),
               EMBED_IMAGES: inference_task(EMBED_IMAGES),
               EMBED_TEXTS: inference_task(EMBED_TEXTS),
               JOIN_SCORE: chunk_task(JOIN_SCORE, **CHUNK_WORK)}


@task_group
def score_chunk(chunk: Chunk) -> Any:
    """One chunk through its stages, each after the stages it needs (``stages.registry``): the
    texts are embedded beside the image fetch."""
    done: dict[str, Any] = {}
    for stage in CHUNK_STAGES.values():
        done[stage.name] = CHUNK_TASKS[stage.name](chunk=chunk)
        for needed in stage.needs:
            done[needed] >> done[stage.name]
    return done[JOIN_SCORE]


# outlets: the results table and the scored CSV; score_drift runs on them.
@task(outlets=OUTLETS, **CHUNK_WORK)
def finalize(scored: list[Counts]) -> Counts:
    from sim_airflow.runs import finalize_run

    return finalize_run(scored)


# Every task: retries, depth-first priority, a last log line when its worker dies, and its
# failure's sentence on the scoring run.
TASK_DEFAULTS = {**RETRIES, **DEPTH_FIRST, "on_retry_callback": note_lost_worker,
                 "on_failure_callback": [note_lost_worker, record_task_failure]}


@dag(schedule=schedule(), start_date=datetime(2024, 1, 1, tzinfo=UTC), catchup=False,
     params=params(), default_args=TASK_DEFAULTS, on_failure_callback=mark_run_failed,
     user_defined_macros=LABEL_MACROS, tags=["sim-pipeline"], doc_md=__doc__)
def similarity_scoring() -> None:
    finalize(score_chunk.expand(chunk=plan_chunks()))


similarity_scoring()
