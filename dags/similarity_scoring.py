"""similarity_scoring: how well each caption describes its image (CLIP), one mapped task per chunk.

    plan_chunks -> fetch_images[chunk] -> embed_images[chunk] -> join_score[chunk] -> finalize
                                       -> embed_texts[chunk]  -^

``[chunk]`` is one mapped task per chunk (``.expand(chunk=chunks)``).

Trigger it with ``{"csv_path": "s3://bucket/pairs.csv"}``; nightly runs read the input of their
logical date (``SIM_PIPELINE_NIGHTLY_INPUT``, default ``<store>/incoming/{{ ds }}.csv``) and skip
when it is missing. Tasks pass only chunk descriptors; images and embeddings stay in the object
store, scores land in the results table under the Airflow run id. Every stage is the library's
(``sim_pipeline.stages``), imported inside the task so parsing this file never loads torch; the
Airflow glue lives in ``plugins/sim_airflow``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from airflow.sdk import chain, dag, task
from sim_airflow.options import FETCH, INFERENCE, RETRIES, execution, params, schedule

Chunk = dict[str, Any]
Counts = dict[str, Any]


@task
def plan_chunks() -> list[Chunk]:
    from sim_airflow.runs import plan_run

    return plan_run()


@task(**FETCH)
def fetch_images(chunk: Chunk) -> Counts:
    from sim_airflow.runs import run_stage

    return run_stage("fetch-images", chunk)


@task(**INFERENCE)
def embed_images(chunk: Chunk) -> Counts:
    from sim_airflow.runs import run_stage

    return run_stage("embed-images", chunk)


@task(**INFERENCE)
def embed_texts(chunk: Chunk) -> Counts:
    from sim_airflow.runs import run_stage

    return run_stage("embed-texts", chunk)


@task
def join_score(chunk: Chunk) -> Counts:
    from sim_airflow.runs import run_stage

    return run_stage("join-score", chunk)


@task
def finalize(scored: list[Counts]) -> Counts:
    from sim_airflow.runs import finalize_run

    return finalize_run(scored)


if execution() == "kubernetes":  # the GPU stages run as pods: `sim-pipeline stage ...` per chunk
    from sim_airflow.pods import gpu_pod

    embed_images, embed_texts = gpu_pod("embed-images"), gpu_pod("embed-texts")  # type: ignore[assignment]


@dag(schedule=schedule(), start_date=datetime(2024, 1, 1, tzinfo=UTC), catchup=False,
     params=params(), default_args=RETRIES, tags=["sim-pipeline"], doc_md=__doc__)
def similarity_scoring() -> None:
    chunks = plan_chunks()
    fetched = fetch_images.expand(chunk=chunks)
    embedded = [embed_images.expand(chunk=chunks), embed_texts.expand(chunk=chunks)]
    scored = join_score.expand(chunk=chunks)
    chain(fetched, embedded, scored, finalize(scored))


similarity_scoring()
