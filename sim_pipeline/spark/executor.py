"""What runs inside an executor's Python worker: each Arrow batch of rows becomes one chunk.

A batch goes through the pipeline's own per-chunk stages (fetch-images, embed-images,
embed-texts, join-score) on the shared object store, so the SSRF guard, limits, retries, robots
rules, image and embedding caches and the scores are exactly those of ``sim-pipeline score``.
The chunk is content-addressed: a retried or speculative task finds the chunk, its fetches,
vectors and results already in the store and redoes nothing, and its rows are upserted on
(run id, row number), so the results table never holds a row twice.

The store, the model and the results database are opened once per Python worker and reused
across batches and tasks for as long as Spark keeps the worker (``spark.python.worker.reuse``).
Each worker keeps a note in the store (``spark/model-loads/<run>/<host>-<pid>.json``): the towers
it loaded, and when each of its batches ran which stage, so a slow job can be read stage by
stage, beside Spark's own event log.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sim_pipeline.core.config import Settings
from sim_pipeline.core.errors import UserError
from sim_pipeline.core.layout import FETCH_IMAGES, sha256_hex
from sim_pipeline.core.store import write_json
from sim_pipeline.results.db import ResultsDB
from sim_pipeline.runners.lifecycle import Run
from sim_pipeline.stages.plan import (
    ChunkRef,
    CsvRow,
    InputRow,
    normalise_csv_rows,
    write_chunks,
)
from sim_pipeline.stages.registry import CHUNK_STAGES
from sim_pipeline.stages.score import ScoredRow, table_row

if TYPE_CHECKING:
    import pandas as pd

ROW_COLUMN = "_sim_row"  # the row identity travelling with each row; never in the output
CORRUPT_COLUMN = "_sim_corrupt"  # the raw text of a CSV row Spark could not fit to the header
MODEL_LOADS_PREFIX = "spark/model-loads"
MAX_NOTED_BATCHES = 100  # a long-lived worker notes its latest batches only
UNDECODABLE = "\ufffd"  # what Spark's CSV reader puts where a byte was not UTF-8
SURROGATE = "\udcff"  # how the CLI's reader sees such a byte: normalise_row repairs and flags it
# forward passes per piece of a batch: the next piece downloads while this one embeds
FETCH_AHEAD_BATCHES = 2
IMPORTED = time.time()  # when this Python worker first unpickled a task (its imports done)


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
        timing = BatchTiming(len(batch))
        rows = list(_input_rows(job, batch))
        scored = _score_chunk(worker, job, rows, timing)
        if job.record_run_id is not None:
            with timing.stage("record"):
                worker.results_db().upsert_scores(
                    table_row(s, job.record_run_id, job.settings.model, row.fields)
                    for s, row in zip(scored, rows, strict=True))
        worker.note(job, timing)
        out = batch[list(job.columns)].copy()
        out["similarity"] = [s.similarity for s in scored]
        out["error"] = [s.error for s in scored]
        yield out


def _score_chunk(worker: Worker, job: ScoringJob, rows: list[InputRow],
                 timing: BatchTiming) -> list[ScoredRow]:
    """The batch in pieces of ``FETCH_AHEAD_BATCHES`` forward passes: the next piece's images
    download while this one's are embedded, so only the first piece's downloads wait in front
    of the model."""
    if not rows:
        return []
    content = "\n".join(row.to_json() for row in rows)
    digest = sha256_hex(content)[:16]
    with timing.stage("plan"):
        chunks = write_chunks(worker.run.store, job.chunk_run_id, digest, rows,
                              FETCH_AHEAD_BATCHES * job.settings.batch_size)
    scored: list[ScoredRow] = []
    fetched = worker.fetch_ahead(chunks[0], timing)
    for index, chunk in enumerate(chunks):
        fetched.result()
        if index + 1 < len(chunks):
            fetched = worker.fetch_ahead(chunks[index + 1], timing)
        try:
            scored += _embed_and_score(worker, chunk, timing)
        except BaseException:
            fetched.cancel()
            raise
    return scored


def _embed_and_score(worker: Worker, chunk: ChunkRef, timing: BatchTiming) -> list[ScoredRow]:
    """The stages after fetch-images on one fetched piece; the last one's rows."""
    result: list[ScoredRow] = []
    for stage in CHUNK_STAGES:
        if stage == FETCH_IMAGES:
            continue
        with timing.stage("wait for the model"):
            worker.model_ready()
        with timing.stage(stage):
            result = worker.run.run_stage(stage, chunk)
    return result


class BatchTiming:
    """When one batch started, and each step's seconds and towers loaded (a load shows up in
    the first stage that needed the model)."""

    def __init__(self, rows: int) -> None:
        self.rows, self.start = rows, time.time()
        self.stages: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started, loads = time.time(), model_loads()
        try:
            yield
        finally:
            self.stages.append({"stage": name, "start": round(started, 3),
                                "seconds": round(time.time() - started, 3),
                                "towers_loaded": model_loads() - loads})

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "start": round(self.start, 3),
                "seconds": round(time.time() - self.start, 3), "stages": self.stages}


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
    """What one Python worker keeps between batches: its run (store), its model and results
    database."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run = Run(settings, _open_store(settings), None)
        self._results: ResultsDB | None = None
        self.created = time.time()
        self.batches: dict[str, list[dict[str, Any]]] = {}  # by job (run id)
        self.model_loaded: tuple[float, float] | None = None  # (started, done), Unix times
        self._problem: str | None = None
        self._check_failed: Exception | None = None  # the check itself broke: said by the job
        self._checked = threading.Event()
        self._preparing: threading.Thread | None = None
        # one thread downloads, piece after piece, beside the towers (which release the GIL)
        self._fetcher = ThreadPoolExecutor(1, thread_name_prefix="fetch-ahead")

    def prepare_model(self, cpus: int) -> None:
        """Check the model as the CLI does, then load both towers, in a thread of its own, now:
        the check runs while the driver reads the input, and the model loads while this worker
        waits for its first rows and downloads their images (waiting on the network, not the
        CPU), instead of after. It loads even when every vector turns out to be cached."""
        self._preparing = threading.Thread(target=self._prepare, args=(cpus,),
                                           name="model-check-and-load", daemon=True)
        self._preparing.start()

    def _prepare(self, cpus: int) -> None:
        try:
            self._problem = model_problem(self.settings)
        except Exception as error:  # noqa: BLE001 - raised to the check job (model_problem)
            self._check_failed = error
        finally:
            self._checked.set()
        if self._problem is None and self._check_failed is None \
                and not self.settings.inference_url:
            self._load_model(cpus)

    def _load_model(self, cpus: int) -> None:
        from sim_pipeline.stages.embed.encoders import encoder_for

        started = time.time()
        try:
            if self.settings.backend == "torch":
                import torch

                torch.set_num_threads(cpus)  # torch gets the task's cores, not the machine's
            for tower in ("image", "text"):
                encoder_for(self.settings, tower)
        except Exception:  # noqa: BLE001 - the stage that needs the tower loads it again, and
            pass  # reports what went wrong as it always does
        self.model_loaded = (started, time.time())

    def model_problem(self) -> str | None:
        """The model check's sentence (None when the model can be scored), once it is known; a
        check that broke raises here, failing the check job, and the driver checks instead."""
        self._checked.wait()
        if self._check_failed is not None:
            raise self._check_failed
        return self._problem

    def model_ready(self) -> None:
        """Wait for the check and the load, so no stage loads a tower beside them."""
        if self._preparing is not None:
            self._preparing.join()

    def fetch_ahead(self, chunk: ChunkRef, timing: BatchTiming) -> Future[Any]:
        """fetch-images on ``chunk`` in the download thread."""
        def fetch() -> Any:
            with timing.stage(FETCH_IMAGES):
                return self.run.run_stage(FETCH_IMAGES, chunk)

        return self._fetcher.submit(fetch)

    def results_db(self) -> ResultsDB:
        if self._results is None:
            self._results = ResultsDB(self.settings.database_url, self.settings.db_retry_seconds)
        return self._results

    def note(self, job: ScoringJob, timing: BatchTiming) -> None:
        """Write this worker's count of model loads and its batches' timings to the store, so
        a job (a test, the benchmark, an operator) can check the model is loaded once per
        worker and see where a batch's time went."""
        batches = self.batches.setdefault(job.chunk_run_id, [])
        batches.append(timing.to_dict())
        del batches[:-MAX_NOTED_BATCHES]
        key = f"{MODEL_LOADS_PREFIX}/{job.chunk_run_id}/{socket.gethostname()}-{os.getpid()}.json"
        write_json(self.run.store, key, {
            "host": socket.gethostname(), "pid": os.getpid(), "tower_loads": model_loads(),
            "imported": round(IMPORTED, 3), "created": round(self.created, 3),
            "model_loaded": self.model_loaded and [round(t, 3) for t in self.model_loaded],
            "batches": batches})


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
    """One per Python worker and settings; it starts checking and loading the model at once."""
    cpus = _task_cpus()
    if settings.fetch_processes == 0:  # Spark spreads the work; each task keeps to its cores
        settings = settings.replace(fetch_processes=cpus)
    worker = Worker(settings)
    worker.prepare_model(cpus)
    return worker


def warm_batches(settings: Settings, batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """``mapInPandas`` body of the warm-up job: the Python worker that runs it starts checking
    and loading the model in the background and goes back to Spark's pool of idle workers at
    once, leaving the core to the driver's next jobs; the scoring job's task finds it there
    (``spark.python.worker.reuse``). No rows."""
    _worker(settings)
    for _ in batches:
        pass
    return iter([])


def check_batches(settings: Settings, batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """``mapInPandas`` body of the check job: one row, this worker's answer to the model check
    (null when the model can be scored), waited for."""
    import pandas as pd

    problem = _worker(settings).model_problem()
    for _ in batches:
        pass
    return iter([pd.DataFrame({"problem": [problem]})])


def model_problem(settings: Settings) -> str | None:
    """Why this worker cannot score with ``settings.model`` (the CLI's check), or None."""
    if settings.inference_url:
        return None
    from sim_pipeline.stages.embed.families import check_backend

    try:
        check_backend(settings.model, settings.backend)
    except UserError as error:
        return str(error)
    return None


def _task_cpus() -> int:
    from pyspark import TaskContext

    context = TaskContext.get()
    return max(1, context.cpus()) if context is not None else 1
