"""similarity_scoring: how well each caption describes its image (CLIP), one mapped task per chunk.

    plan_chunks -> fetch_images[chunk] -> embed_images[chunk] -> join_score[chunk] -> finalize
                                       -> embed_texts[chunk]  -^

``[chunk]`` is one mapped task per chunk (``.expand(chunk=chunks)``).

Trigger it with ``{"csv_path": "s3://bucket/pairs.csv"}``; nightly runs read the input of their
logical date (``SIM_PIPELINE_NIGHTLY_INPUT``, default ``<store>/incoming/{{ ds }}.csv``) and skip
when it is missing. Tasks pass only chunk descriptors; images and embeddings stay in the object
store, scores land in the results table under the Airflow run id. Every stage is the library's
(``sim_pipeline.runners.dispatch``), imported inside the task: parsing never loads torch.
``embed_images`` and ``embed_texts`` run in-process, or as one Kubernetes pod per chunk with
``SIM_PIPELINE_EXECUTION=kubernetes``. The Airflow glue lives in ``plugins/sim_airflow``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from airflow.sdk import chain, dag, task
from sim_airflow.options import FETCH, RETRIES, params, schedule
from sim_airflow.tasks import chunk_task, inference_task

Chunk = dict[str, Any]
Counts = dict[str, Any]


@task
def plan_chunks() -> list[Chunk]:
    from sim_airflow.runs import plan_run

    return plan_run()


fetch_images = chunk_task("fetch-images", **FETCH)
embed_images = inference_task("embed-images")
embed_texts = inference_task("embed-texts")
join_score = chunk_task("join-score")


@task
def finalize(scored: list[Counts]) -> Counts:
    from sim_airflow.runs import finalize_run

    return finalize_run(scored)


@dag(schedule=schedule(), start_date=datetime(2024, 1, 1, tzinfo=UTC), catchup=False,
     params=params(), default_args=RETRIES, tags=["sim-pipeline"], doc_md=__doc__)
def similarity_scoring() -> None:
    chunks = plan_chunks()
    fetched = fetch_images.expand(chunk=chunks)
    embedded = [embed_images.expand(chunk=chunks), embed_texts.expand(chunk=chunks)]
    scored = join_score.expand(chunk=chunks)
    chain(fetched, embedded, scored, finalize(scored))


similarity_scoring()
