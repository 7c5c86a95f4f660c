"""What the service does per request, built from the pipeline's own stages.

Fetching is the fetch stage's ``Downloader`` (same SSRF guard, limits, retries), shared by all
requests, with bytes and records cached by ``save_fetch`` exactly where ``fetch-images`` puts
them; decoding is ``decode_image``; vectors come from the embedding cache shared with the batch
pipeline, and only missing ones go to the model, through a ``MicroBatcher`` per tower. Every
image of a request moves on its own (fetch, cache, decode, batch), so one slow download delays
nothing else. Blocking calls (store, database, decoding, the model) run on thread pools.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np
import sqlalchemy as sa

from sim_pipeline.core.config import Settings
from sim_pipeline.core.errors import TOO_LARGE, UserError
from sim_pipeline.core.layout import caption_hash, image_key
from sim_pipeline.core.store import open_store, read_json, sha256_bytes
from sim_pipeline.results.db import ResultsDB
from sim_pipeline.serve.batcher import MicroBatcher
from sim_pipeline.serve.limits import Admission
from sim_pipeline.serve.metrics import ServeMetrics
from sim_pipeline.serve.models import ImageInput, Pair
from sim_pipeline.serve.options import ServeOptions
from sim_pipeline.stages.decode import DecodeFailed, decode_image
from sim_pipeline.stages.embed.encoders import encoder_for, vector_tag
from sim_pipeline.stages.embed.images import DECODE_WORKERS
from sim_pipeline.stages.embed.vector_cache import IO_THREADS, VectorCache
from sim_pipeline.stages.fetch.download import Downloader
from sim_pipeline.stages.fetch.records import cached_record, save_fetch
from sim_pipeline.stages.plan import InputRow, normalise_row
from sim_pipeline.stages.score import ScoredRow, failed_row, scored_pair, table_row

log = logging.getLogger(__name__)
T = TypeVar("T")
Vector = np.ndarray
VectorOrCode = np.ndarray | str  # a vector, or the error code of why there is none
IMAGE_KEY = re.compile(r"^images/([0-9a-f]{2})/\1[0-9a-f]{62}$")
PROBE_TIMEOUT_S = 5.0
SERVICE_SOURCE = "sim-pipeline serve"


class BadInput(Exception):
    """A request the caller must fix (an unknown store key, bad base64): 422, one sentence."""


class NotReady(Exception):
    """The model is not loaded (yet): 503 with Retry-After."""


class Unavailable(Exception):
    """A dependency (the results database) cannot be reached: 503."""


@dataclass
class Towers:
    """The loaded model: both encoders and the tag their cached vectors live under."""

    image: Any
    text: Any
    tag: str


@dataclass(frozen=True)
class ImageSource:
    """An image input resolved: its sha256 and how to read its bytes, or why there is none."""

    sha: str | None = None
    read: Callable[[], bytes] = bytes
    error: str | None = None


def scored_row(row: InputRow, image: VectorOrCode | None, text: Vector | None) -> ScoredRow:
    """A pair's result, as join-score computes it: the first error met, else the similarity."""
    if isinstance(image, str) or image is None or text is None:
        error = row.error or (image if isinstance(image, str) else None)
        return failed_row(row, error)
    return scored_pair(row, image, text)


def service_run_id(now: datetime | None = None) -> str:
    """Rows recorded by the service go to one run per day, so they can be queried and pruned
    like any run."""
    return f"serve-{(now or datetime.now(UTC)):%Y%m%d}"


def row_base(now_ns: int | None = None) -> int:
    """First row number of a recorded request: its arrival in microseconds times 1000 (requests
    carry at most 1000 pairs), so rows sort by arrival and replicas hardly ever collide."""
    return ((now_ns or time.time_ns()) // 1000) * 1000


class Service:
    def __init__(self, settings: Settings, options: ServeOptions, metrics: ServeMetrics,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        self.settings, self.options, self.metrics = settings, options, metrics
        self.on_fatal = on_fatal
        self.store = open_store(settings.store, settings.s3)
        self.admission = Admission(options.max_queue)
        self.io = ThreadPoolExecutor(IO_THREADS, "store")
        self.decoders = ThreadPoolExecutor(DECODE_WORKERS, "decode")
        self.inference = ThreadPoolExecutor(1, "inference")  # one model, one forward at a time
        self.towers: Towers | None = None
        self.model_state = "loading"
        self._db: ResultsDB | None = None
        self._db_lock = threading.Lock()
        self._runs_opened: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.downloader = await Downloader(self.settings).__aenter__()
        batch, wait = self.options.max_batch_size, self.options.max_wait_ms
        self.image_batcher = MicroBatcher("image", self._encode_images, self.inference,
                                          self.metrics, batch, wait)
        self.text_batcher = MicroBatcher("text", self._encode_texts, self.inference,
                                         self.metrics, batch, wait)
        self.image_batcher.start()
        self.text_batcher.start()
        task = asyncio.get_running_loop().create_task(self._load())
        self._tasks.add(task)  # /healthz answers while the model loads; /readyz says "loading"
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """After uvicorn drained the requests in flight."""
        await self.image_batcher.stop()
        await self.text_batcher.stop()
        await self.downloader.__aexit__(None, None, None)
        for pool in (self.inference, self.decoders, self.io):
            pool.shutdown(wait=True)

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.towers = await loop.run_in_executor(self.inference, self._load_towers)
            self.model_state = "loaded"
        except UserError as error:
            self.model_state = f"failed to load: {error}"
            log.error("%s", error)
            if self.on_fatal is not None:
                self.on_fatal(str(error))

    def _load_towers(self) -> Towers:
        loaded = {}
        for tower in ("image", "text"):
            started = time.perf_counter()
            loaded[tower] = encoder_for(self.settings, tower)
            self.metrics.model_load.labels(tower).set(round(time.perf_counter() - started, 3))
        return Towers(loaded["image"], loaded["text"], vector_tag(self.settings))

    def ready_towers(self) -> Towers:
        if self.towers is None:
            raise NotReady(f"The model is {self.model_state}; retry shortly.")
        return self.towers

    @contextmanager
    def admitted(self, items: int) -> Iterator[None]:
        """Admission past ``--max-queue`` fails with ``AtCapacity`` (503), before any work."""
        with self.admission.admit(items):
            self.metrics.in_flight.set(self.admission.in_flight)
            try:
                yield
            finally:
                self.metrics.in_flight.set(self.admission.in_flight - items)

    # -- readiness ---------------------------------------------------------------------------

    async def readiness(self) -> dict[str, str]:
        store, database = await asyncio.gather(self._probe(self._probe_store),
                                               self._probe(self._probe_database))
        return {"model": self.model_state, "store": store, "database": database}

    async def _probe(self, check: Callable[[], None]) -> str:
        try:
            await asyncio.wait_for(self._io(check), PROBE_TIMEOUT_S)
        except TimeoutError:
            return f"unreachable: no answer within {PROBE_TIMEOUT_S:g} s"
        except (UserError, OSError, sa.exc.SQLAlchemyError) as error:
            return f"unreachable: {_first_line(error)}"
        return "ok"

    def _probe_store(self) -> None:
        self.store.exists("serve/readiness-probe")

    def _probe_database(self) -> None:
        with self.database().engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def database(self) -> ResultsDB:
        """Opened on first use and retried until it works, so a database that is down when the
        service starts makes it unready, not dead."""
        with self._db_lock:
            if self._db is None:
                self._db = ResultsDB(self.settings.database_url, self.settings.db_retry_seconds)
            return self._db

    # -- scoring -----------------------------------------------------------------------------

    async def score(self, pairs: Sequence[Pair], record: bool) -> tuple[str | None,
                                                                        list[ScoredRow]]:
        self.ready_towers()
        rows = [normalise_row(i, p.url, p.caption, [p.url, p.caption])
                for i, p in enumerate(pairs)]
        live = [r for r in rows if r.error is None]
        urls = {r.url_hash: r.url for r in live if r.url_hash}
        async with asyncio.TaskGroup() as group:
            texts = group.create_task(self.text_vectors([r.caption for r in live]))
            images = {h: group.create_task(self._url_vector(h, u)) for h, u in urls.items()}
        text_vectors = dict(zip([r.caption for r in live], texts.result(), strict=True))
        scored = [scored_row(row, images[row.url_hash].result() if row.error is None else None,
                             text_vectors.get(row.caption)) for row in rows]
        self.metrics.count_errors(s.error for s in scored)
        run_id = service_run_id() if record else None
        if run_id is not None:
            await self._record(run_id, scored)
        return run_id, scored

    async def _url_vector(self, url_hash: str, url: str) -> VectorOrCode:
        record = await self._fetch_record(url_hash, url)
        if record.get("error"):
            return record["error"]
        return await self._image_vector(record["sha256"],
                                        lambda: self.store.read_bytes(image_key(url_hash)))

    async def _fetch_record(self, url_hash: str, url: str) -> dict[str, Any]:
        """The fetch stage's record of ``url``: from the store, or fetched and saved there."""
        cached = await self._io(cached_record, self.store, url_hash,
                                self.settings.refetch_errors)
        self.metrics.cache_lookup("image_bytes", cached is not None)
        if cached is not None:
            return cached
        outcome = await self.downloader.fetch(url)
        record = await self._io(save_fetch, self.store, url_hash, url, outcome,
                                self.settings.max_pixels)
        return asdict(record)

    async def _record(self, run_id: str, scored: list[ScoredRow]) -> None:
        base = row_base()
        rows = [table_row(ScoredRow(base + s.row, s.url, s.url_hash, s.caption, s.similarity,
                                    s.cosine, s.error), run_id, self.settings.model,
                          [s.url, s.caption]) for s in scored]
        try:
            await self._io(self._write_rows, run_id, rows)
        except (UserError, sa.exc.SQLAlchemyError) as error:
            raise Unavailable(f"The pairs were scored but not recorded: the results database is "
                              f"unreachable ({_first_line(error)}).") from None

    def _write_rows(self, run_id: str, rows: list[dict[str, object]]) -> None:
        db = self.database()
        with self._db_lock:  # each run opened once per process; the set is only a cache
            if run_id not in self._runs_opened:
                # never start_run: it would delete rows another replica has recorded
                db.open_run_if_absent(run_id, SERVICE_SOURCE, self.settings.model, 0)
                self._runs_opened.add(run_id)
        db.upsert_scores(rows)

    # -- embeddings --------------------------------------------------------------------------

    async def text_vectors(self, texts: list[str]) -> list[Vector]:
        """One vector per text (repeats embedded once), cached ones without inference."""
        towers = self.ready_towers()
        hashes = [caption_hash(t) for t in texts]
        by_hash = dict(zip(hashes, texts, strict=True))
        cache = VectorCache(self.store, towers.tag, "texts")
        found = await self._io(cache.get_many, list(by_hash))
        for h in by_hash:
            self.metrics.cache_lookup("text_vector", h in found)
        missing = [h for h in by_hash if h not in found]
        new = await asyncio.gather(*(self.text_batcher.submit((h, by_hash[h])) for h in missing))
        found.update(zip(missing, new, strict=True))
        return [found[h] for h in hashes]

    async def image_vectors(self, inputs: Sequence[ImageInput]) -> list[VectorOrCode]:
        """One vector (or error code) per image given as bytes or as a fetched image's key."""
        self.ready_towers()
        sources = await asyncio.gather(*(self._io(self._image_source, i, given)
                                         for i, given in enumerate(inputs)))
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self._image_vector(source.sha, source.read))
                     if source.sha else None for source in sources]
        return [task.result() if task else source.error
                for task, source in zip(tasks, sources, strict=True)]

    def _image_source(self, index: int, given: ImageInput) -> ImageSource:
        """Where an input's bytes come from, or its error code; ``BadInput`` when the caller
        must fix the request."""
        if given.key is not None:
            if not IMAGE_KEY.match(given.key):
                raise BadInput(f"images[{index}].key must look like images/<h[:2]>/<h> (h: 64 "
                               "hex digits), the key of a fetched image.")
            try:
                record = read_json(self.store, f"{given.key}.json")
            except KeyError:
                raise BadInput(f"images[{index}].key {given.key} is not a fetched image in the "
                               "object store.") from None
            if record.get("error"):
                return ImageSource(error=record["error"])
            key = given.key
            return ImageSource(record["sha256"], lambda: self.store.read_bytes(key))
        try:
            data = base64.b64decode(given.data or "", validate=True)
        except binascii.Error:
            raise BadInput(f"images[{index}].data is not valid base64.") from None
        if len(data) > self.settings.max_image_bytes:
            return ImageSource(error=TOO_LARGE)
        return ImageSource(sha256_bytes(data), lambda: data)

    async def _image_vector(self, sha: str, read: Callable[[], bytes]) -> VectorOrCode:
        cache = VectorCache(self.store, self.ready_towers().tag, "images")
        found = await self._io(cache.get_many, [sha])
        self.metrics.cache_lookup("image_vector", sha in found)
        if sha in found:
            return found[sha]
        loop = asyncio.get_running_loop()
        try:
            image = await loop.run_in_executor(
                self.decoders, lambda: decode_image(read(), self.settings.max_pixels))
        except DecodeFailed as failure:
            return failure.code
        return await self.image_batcher.submit((sha, image))

    # -- on the inference thread -------------------------------------------------------------

    def _encode_images(self, items: list[tuple[str, Any]]) -> list[Vector]:
        towers = self.ready_towers()
        vectors = towers.image.encode_pixels(towers.image.preprocess([i for _, i in items]))
        self._cache_later(VectorCache(self.store, towers.tag, "images"), items, vectors)
        return list(vectors)

    def _encode_texts(self, items: list[tuple[str, str]]) -> list[Vector]:
        towers = self.ready_towers()
        vectors = towers.text.encode_texts([text for _, text in items])
        self._cache_later(VectorCache(self.store, towers.tag, "texts"), items, vectors)
        return list(vectors)

    def _cache_later(self, cache: VectorCache, items: list[tuple[str, Any]],
                     vectors: np.ndarray) -> None:
        """Cache writes go to the store threads: the model never waits on the store."""
        new = {h: v for (h, _), v in zip(items, vectors, strict=True)}
        self.io.submit(cache.put_many, new).add_done_callback(_log_failure)

    async def _io(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.io, call, *args)


def _log_failure(future: Future[None]) -> None:
    if (error := future.exception()) is not None:
        log.warning("Could not cache vectors: %s", _first_line(error))


def _first_line(error: BaseException) -> str:
    orig = getattr(error, "orig", None)
    return (str(orig or error).strip().splitlines() or [type(error).__name__])[0]
