"""What runs inside an executor's Python worker: each Arrow batch of rows becomes one chunk.

A batch goes through the pipeline's own per-chunk stages (fetch-images, embed-images,
embed-texts, join-score) on the shared object store, so the SSRF guard, limits, retries, robots
rules, image and embedding caches and the scores are exactly those of ``sim-pipeline score``.
The chunk is content-addressed: a retried or speculative task finds the chunk, its fetches,
vectors and results already in the store and redoes nothing, and its rows are upserted on
(run id, row number), so the results table never holds a row twice.

The store, the model and the results database are opened once per Python worker and reused
across batches and tasks for as long as Spark keeps the worker (``spark.python.worker.reuse``).
"""

from __future__ import annotations

import csv
import functools
import io
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sim_pipeline.core.config import Settings
from sim_pipeline.core.layout import sha256_hex
from sim_pipeline.core.store import write_json
from sim_pipeline.results.db import ResultsDB
from sim_pipeline.runners.lifecycle import Run
from sim_pipeline.stages.plan import CsvRow, InputRow, normalise_csv_rows, write_chunks
from sim_pipeline.stages.registry import CHUNK_STAGES
from sim_pipeline.stages.score import ScoredRow, table_row

if TYPE_CHECKING:
    import pandas as pd

ROW_COLUMN = "_sim_row"  # the row identity travelling with each row; never in the output
CORRUPT_COLUMN = "_sim_corrupt"  # the raw text of a CSV row Spark could not fit to the header
MODEL_LOADS_PREFIX = "spark/model-loads"
UNDECODABLE = "\ufffd"  # what Spark's CSV reader puts where a byte was not UTF-8
SURROGATE = "\udcff"  # how the CLI's reader sees such a byte: normalise_row repairs and flags it


@dataclass(frozen=True)
class ScoringJob:
    """Everything an executor needs, shipped with the task as data (no environment relay)."""

    settings: Settings
    columns: tuple[str, ...]  # the input columns, in order
    url_column: str
    caption_column: str
    chunk_run_id: str  # the store namespace of this job's chunks
    record_run_id: str | None = None  # upsert rows into the results table under this run
    from_csv: bool = False  # rows read by ``read_input``: U+FFFD marks undecodable bytes
    delimiter: str = ","


def score_batches(job: ScoringJob, batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """``mapInPandas`` body: every input column kept, plus ``similarity`` and ``error``."""
    worker = _worker(job.settings)
    for batch in batches:
        rows = list(_input_rows(job, batch))
        scored = _score_chunk(worker, job, rows)
        if job.record_run_id is not None:
            worker.results_db().upsert_scores(
                table_row(s, job.record_run_id, job.settings.model, row.fields)
                for s, row in zip(scored, rows, strict=True))
        worker.note_model_loads(job)
        out = batch[list(job.columns)].copy()
        out["similarity"] = [s.similarity for s in scored]
        out["error"] = [s.error for s in scored]
        yield out


def _score_chunk(worker: Worker, job: ScoringJob, rows: list[InputRow]) -> list[ScoredRow]:
    if not rows:
        return []
    content = "\n".join(row.to_json() for row in rows)
    digest = sha256_hex(content)[:16]
    (chunk,) = write_chunks(worker.run.store, job.chunk_run_id, digest, rows, len(rows))
    scored: list[ScoredRow] = []
    for stage in CHUNK_STAGES:
        scored = worker.run.run_stage(stage, chunk)
    return scored


def _input_rows(job: ScoringJob, batch: pd.DataFrame) -> Iterator[InputRow]:
    """The batch's rows as plan would have made them from the same CSV lines."""
    header = list(job.columns)
    url_index, caption_index = header.index(job.url_column), header.index(job.caption_column)
    numbers = batch[ROW_COLUMN].tolist()
    corrupt = batch[CORRUPT_COLUMN].tolist() if CORRUPT_COLUMN in batch else [None] * len(batch)
    values = batch[header].itertuples(index=False, name=None)
    parsed = (CsvRow(_fields(job, list(row), raw)) for row, raw in zip(values, corrupt,
                                                                       strict=True))
    for number, row in zip(numbers, normalise_csv_rows(header, url_index, caption_index, parsed),
                           strict=True):
        yield replace(row, row=int(number))


def _fields(job: ScoringJob, values: list[Any], corrupt: str | None) -> list[str]:
    """A row's values as text; a row Spark found malformed is split again as the CLI splits it,
    so one with more fields than the header gets ``malformed_row`` there too."""
    fields = [_text(value) for value in values]
    if isinstance(corrupt, str) and corrupt:  # pandas gives NaN where Spark had null
        reparsed = next(csv.reader(io.StringIO(corrupt, newline=""), delimiter=job.delimiter), [])
        if len(reparsed) > len(fields):
            fields = reparsed
    if job.from_csv:
        fields = [field.replace(UNDECODABLE, SURROGATE) for field in fields]
    return fields


def _text(value: Any) -> str:
    if value is None:
        return ""
    try:
        import pandas as pd

        if pd.isna(value):
            return ""
    except (TypeError, ValueError):  # arrays and the like: never NA as a whole
        pass
    return value if isinstance(value, str) else str(value)


class Worker:
    """What one Python worker keeps between batches: its run (store) and results database."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run = Run(settings, _open_store(settings), None)
        self._results: ResultsDB | None = None
        self._noted_loads = 0

    def results_db(self) -> ResultsDB:
        if self._results is None:
            self._results = ResultsDB(self.settings.database_url, self.settings.db_retry_seconds)
        return self._results

    def note_model_loads(self, job: ScoringJob) -> None:
        """Write this worker's count of model loads to the store when it changed, so a job (a
        test, the benchmark, an operator) can check the model is loaded once per worker."""
        loads = model_loads()
        if loads == self._noted_loads:
            return
        self._noted_loads = loads
        key = f"{MODEL_LOADS_PREFIX}/{job.chunk_run_id}/{socket.gethostname()}-{os.getpid()}.json"
        write_json(self.run.store, key, {"host": socket.gethostname(), "pid": os.getpid(),
                                         "tower_loads": loads})


def model_loads() -> int:
    """How many towers this process has loaded (each model has two: image and text)."""
    import sys

    model = sys.modules.get("sim_pipeline.stages.embed.model")
    return 0 if model is None else model.load_encoder.cache_info().misses


def _open_store(settings: Settings):  # noqa: ANN202 - an ObjectStore
    from sim_pipeline.core.store import open_store

    return open_store(settings.store, settings.s3)


@functools.lru_cache(maxsize=2)
def _worker(settings: Settings) -> Worker:
    """One per Python worker and settings; torch gets the task's cores, not the machine's."""
    cpus = _task_cpus()
    if settings.fetch_processes == 0:  # Spark spreads the work; each task keeps to its cores
        settings = settings.replace(fetch_processes=cpus)
    if settings.backend == "torch" and not settings.inference_url:
        import torch

        torch.set_num_threads(cpus)
    return Worker(settings)


def _task_cpus() -> int:
    from pyspark import TaskContext

    context = TaskContext.get()
    return max(1, context.cpus()) if context is not None else 1
