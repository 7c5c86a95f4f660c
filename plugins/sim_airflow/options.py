"""The DAG's Airflow-side knobs, its trigger form, pools and retry policy.

Each knob is the plain environment variable ``SIM_PIPELINE_<NAME>`` of the process that parses the
DAG file or runs the task, read by ``sim_pipeline.core.config`` (the one reader of every
``SIM_PIPELINE_*`` variable) and interpreted here; unset or empty means the default. They are
deployment settings, set where Airflow's components are started (the scheduler, dag-processor and
workers alike), not Airflow Variables: the DAG file reads ``SCHEDULE``, ``EXECUTION`` and ``POD`` at
parse time, and reading the metadata database or a secrets backend there would slow every parse.
The DAG file imports this module at parse time, so it imports nothing heavy: of ``sim_pipeline``
only its configuration reader, no torch.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Any

from airflow.sdk import Param

from sim_airflow.pools import CHUNK_POOL, FETCH_POOL, GPU_POOL
from sim_pipeline.core.config import variable

DEFAULT_SCHEDULE = "0 2 * * *"
DEFAULT_NIGHTLY_INPUT = "{store}/incoming/{{{{ ds }}}}.csv"
DEFAULT_STORE_CONN_ID = "sim_pipeline_store"
DEFAULT_RESULTS_CONN_ID = "sim_pipeline_results"
EXECUTIONS = ("local", "kubernetes")
# The trigger form's chunk_size bounds: below 100 rows a chunk costs more in task overhead than
# it does work (and 0 or 1 would mean thousands of task instances); above 100,000 one task holds
# too many images and embeddings at once.
CHUNK_SIZE_FLOOR, CHUNK_SIZE_CEILING = 100, 100_000


def option(name: str, default: str | None = None) -> str | None:
    """The environment variable ``SIM_PIPELINE_<NAME>``, else ``default`` when unset or empty."""
    return variable(name) or default


def retry_delay() -> timedelta:
    """``SIM_PIPELINE_RETRY_DELAY_SECONDS``: the first wait before a retry (default 30). A stack
    whose worker may be killed on purpose (``make stack``'s test) retries after a few seconds."""
    return timedelta(seconds=float(option("RETRY_DELAY_SECONDS", "30") or 30))


def inference_queue() -> str | None:
    """``SIM_PIPELINE_INFERENCE_QUEUE``: the executor queue of the embedding tasks, so that a GPU
    host's worker subscribes to it alone (CeleryExecutor; ``make stack`` sets ``inference``).
    Unset, they go to ``[operators] default_queue`` like every other task: a single worker that
    consumes the default queue then runs everything."""
    return option("INFERENCE_QUEUE")


def worker_hostname() -> str:
    """The host name a task instance records (``[core] hostname_callable``): the worker's
    ``SIM_PIPELINE_WORKER_NAME``, else the machine's name. Two workers on one machine (``make
    stack``) then show which of them ran each task."""
    return option("WORKER_NAME") or socket.getfqdn()


# Every task reads or writes the store and the results database, so every task may retry; waits
# grow 30 s, 60 s, 120 s ... up to 10 min so a flaky endpoint gets time to recover.
RETRIES: dict[str, Any] = {
    "retries": 2, "retry_delay": retry_delay(), "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10)}
FETCH: dict[str, Any] = {"retries": 4, "pool": FETCH_POOL}
# plan, join-score and finalize: the fetch queue's other pool (sim_airflow.pools).
CHUNK_WORK: dict[str, Any] = {"pool": CHUNK_POOL}
# Depth-first: a task's priority is the sum of its upstream tasks' weights, so a chunk's later
# stages run before another chunk's fetch once both are ready.
DEPTH_FIRST: dict[str, Any] = {"weight_rule": "upstream"}
INFERENCE: dict[str, Any] = {"pool": GPU_POOL,
                              **({"queue": q} if (q := inference_queue()) else {})}


def schedule() -> str | None:
    """The nightly cron (``SIM_PIPELINE_SCHEDULE``); ``none`` leaves the DAG to manual runs."""
    value = option("SCHEDULE", DEFAULT_SCHEDULE)
    return None if value is None or value.strip().lower() == "none" else value.strip()


def execution() -> str:
    """``SIM_PIPELINE_EXECUTION``: ``local`` (the default) runs the GPU stages in-process on the
    Airflow workers; ``kubernetes`` runs them as pods."""
    value = (option("EXECUTION", "local") or "local").strip().lower()
    if value not in EXECUTIONS:
        raise ValueError(f"SIM_PIPELINE_EXECUTION={value!r} is not one of {', '.join(EXECUTIONS)}.")
    return value


def pod_settings_json() -> str | None:
    """``SIM_PIPELINE_POD``: a JSON object of the GPU pods' settings (``sim_airflow.pods``)."""
    return option("POD")


def nightly_input(store: str) -> str:
    """``SIM_PIPELINE_NIGHTLY_INPUT``, the input path template of runs without ``csv_path``
    (rendered with the run's context); by default ``<store>/incoming/{{ ds }}.csv``."""
    return option("NIGHTLY_INPUT") or DEFAULT_NIGHTLY_INPUT.format(store=store.rstrip("/"))


def progress_seconds() -> float:
    """``SIM_PIPELINE_PROGRESS_SECONDS``: how often a running stage logs that it is still running
    (default 30)."""
    return float(option("PROGRESS_SECONDS", "30") or 30)


def store_conn_id() -> str:
    """``SIM_PIPELINE_STORE_CONN_ID``: the aws connection of the store and s3:// files."""
    return option("STORE_CONN_ID") or DEFAULT_STORE_CONN_ID


def results_conn_id() -> str:
    """``SIM_PIPELINE_RESULTS_CONN_ID``: the postgres connection of the results database."""
    return option("RESULTS_CONN_ID") or DEFAULT_RESULTS_CONN_ID


def params() -> dict[str, Param]:
    """The trigger form; fresh Param objects per DAG, since resolving a run's conf mutates them."""
    return {
        "csv_path": Param(
            None, type=["null", "string"], title="Input CSV",
            description="Local path or s3:// URI of a CSV with an image URL and a caption column. "
            "Leave empty to read the nightly input for the run's logical date "
            "(SIM_PIPELINE_NIGHTLY_INPUT, default <store>/incoming/{{ ds }}.csv)."),
        "output_path": Param(
            None, type=["null", "string"], title="Scored CSV",
            description="Where to write the scored CSV (its report goes beside it), a local path "
            "or s3:// URI. Leave empty for <input>_<run id>_scored.csv beside the input, so runs "
            "never overwrite each other."),
        "chunk_size": Param(
            None, type=["null", "integer"], minimum=CHUNK_SIZE_FLOOR,
            maximum=CHUNK_SIZE_CEILING, title="Rows per chunk",
            description=f"Rows per chunk, {CHUNK_SIZE_FLOOR} to {CHUNK_SIZE_CEILING}; each chunk "
            "flows through fetch, embed and score on its own (one mapped task group). Leave empty "
            "for SIM_PIPELINE_CHUNK_SIZE (default 10000). Grown automatically, and logged, when "
            "the input would need more chunks than [core] max_map_length (1024) allows."),
        "model": Param(
            None, type=["null", "string"], title="CLIP model",
            description="Hugging Face model id or a folder saved with save_pretrained. Leave empty "
            "for SIM_PIPELINE_MODEL (default openai/clip-vit-base-patch32)."),
    }
