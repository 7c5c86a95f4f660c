"""Worker processes for the fetch stage: one event loop uses at most one core (the GIL).

A standard ``ProcessPoolExecutor`` with the spawn start method: workers are fresh interpreters
that inherit no threads, and each job carries everything it needs as arguments (the URLs, the
store, the settings), so nothing travels through the environment. The pool is kept for the life
of the process, so only the first large chunk pays the workers' start (about half a second).

Workers never outlive their parent: each holds the read end of a pipe whose only write end is the
parent's, and a thread in each worker exits the process as soon as that end closes: when the
parent closes it (an error, Ctrl-C, SIGTERM) or when the parent is gone, SIGKILL included (the
kernel closes it then). No lock is shared, so a worker that dies cannot block the others. Workers
ignore SIGINT: a Ctrl-C in a terminal reaches the whole process group, and it is the parent's.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import multiprocessing
import os
import pickle
import signal
import threading
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection

from sim_pipeline.core import repairs
from sim_pipeline.core.config import Settings
from sim_pipeline.core.store import ObjectStore
from sim_pipeline.stages.fetch.loop import fetch_urls
from sim_pipeline.stages.fetch.records import FetchStats

Job = tuple[dict[str, str], ObjectStore, Settings]


class _Pool:
    """The process pool and its lifeline pipe, (re)made on demand; at most one at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None
        self._lifeline: Connection | None = None  # the write end; closing it stops the workers
        self._size = 0
        atexit.register(self.close)

    def executor(self, size: int) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None or self._size < size:
                self._close_locked(stop_running=False)
                context = multiprocessing.get_context("spawn")
                watched, self._lifeline = context.Pipe(duplex=False)
                self._executor = ProcessPoolExecutor(
                    size, mp_context=context, initializer=_start_worker, initargs=(watched,))
                self._size = size
            return self._executor

    def close(self, stop_running: bool = False) -> None:
        """Stop the workers; ``stop_running`` makes them abandon jobs in flight."""
        with self._lock:
            self._close_locked(stop_running)

    def _close_locked(self, stop_running: bool) -> None:
        if self._lifeline is not None and stop_running:
            self._lifeline.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        if self._lifeline is not None and not self._lifeline.closed:
            self._lifeline.close()
        self._executor, self._lifeline, self._size = None, None, 0


_POOL = _Pool()


def run(jobs: list[Job]) -> list[FetchStats]:
    """Run ``fetch_urls(*job)`` for each job, one worker each, all at once.

    A ``UserError`` met in a worker (bad credentials, a full disk) is raised here as it was.
    On any failure, or an interrupt, every worker stops its downloads before this returns.
    """
    executor = _POOL.executor(len(jobs))
    futures = [executor.submit(_fetch_job, pickle.dumps(job)) for job in jobs]
    try:
        done = [future.result() for future in futures]
    except BrokenProcessPool:
        _POOL.close(stop_running=True)
        raise RuntimeError("a fetch worker process died before finishing its share of the "
                           "chunk; rerun to resume") from None
    except BaseException:
        _POOL.close(stop_running=True)
        raise
    for _, repaired in done:
        repairs.add(repaired)  # into the tally of the step that ran the jobs
    return [stats for stats, _ in done]


def stop_all() -> None:
    """Stop every worker now (the caller is shutting down)."""
    _POOL.close(stop_running=True)


def _fetch_job(job: bytes) -> tuple[FetchStats, Counter[str]]:
    """Unpickled here, not by the pool: opening the store can fail (an unreachable S3
    endpoint), and that is the job's error to report, not a reason for the worker to die.
    The repairs the job made come back with its statistics."""
    urls, store, settings = pickle.loads(job)
    with repairs.counted() as repaired:
        stats = asyncio.run(fetch_urls(urls, store, settings))
    return stats, repaired


def _start_worker(lifeline: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch, args=(lifeline,), name="lifeline", daemon=True).start()


def _watch(lifeline: Connection) -> None:
    """Exit as soon as the parent's end of the pipe closes (or anything arrives on it)."""
    with contextlib.suppress(OSError, EOFError):
        lifeline.poll(None)
    os._exit(1)  # no cleanup: the downloads in flight are abandoned on purpose

