"""Worker processes for the fetch stage: one event loop uses at most one core (the GIL).

Workers are fresh interpreters (``python -c``), not multiprocessing children: they never re-run
the caller's main script and inherit no threads. They are kept for the life of this process,
so only the first large chunk pays their start (about half a second); each job carries the
caller's environment, so a worker sees ``AWS_*`` and friends as they are now.

A job is a length-prefixed pickle on the worker's stdin, and so is its answer on stdout.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import pickle
import subprocess
import sys
import threading
from typing import IO, Any

from sim_pipeline.errors import UserError

_COMMAND = "from sim_pipeline.fetch_workers import serve; serve()"


def _send(stream: IO[bytes], value: Any) -> None:
    data = pickle.dumps(value)
    stream.write(len(data).to_bytes(8, "big") + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    """The next value, or EOFError when the other side has gone."""
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError
    return pickle.loads(stream.read(int.from_bytes(header, "big")))


class WorkerPool:
    """Idle worker processes, started on demand and stopped at exit."""

    def __init__(self) -> None:
        self._idle: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        atexit.register(self.close)

    def run(self, jobs: list[tuple[Any, ...]]) -> list[Any]:
        """Run ``fetch_urls(*job)`` for each job, one worker each, all at once."""
        workers = [self._take() for _ in jobs]
        environment = dict(os.environ)
        try:
            for worker, job in zip(workers, jobs, strict=True):
                _send(worker.stdin, (environment, pickle.dumps(job)))
            results = [self._collect(worker) for worker in workers]
        except BaseException:  # Ctrl-C or a dead worker: stop the others' downloads too
            self._discard(workers)
            raise
        for result in results:
            if isinstance(result, UserError):
                raise result
        return results

    def _take(self) -> subprocess.Popen[bytes]:
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.poll() is None:
                    return worker
        return subprocess.Popen([sys.executable, "-c", _COMMAND], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE)

    def _collect(self, worker: subprocess.Popen[bytes]) -> Any:
        """The worker's answer; a worker that died (its traceback is on stderr) is an error."""
        try:
            result = _receive(worker.stdout)
        except EOFError:
            worker.wait()
            raise RuntimeError(f"a fetch worker process died (exit status {worker.returncode})"
                               ) from None
        with self._lock:
            self._idle.append(worker)
        return result

    def _discard(self, workers: list[subprocess.Popen[bytes]]) -> None:
        with self._lock:
            self._idle = [w for w in self._idle if w not in workers]
        for worker in workers:
            worker.kill()
            worker.wait()

    def close(self) -> None:
        """Closing a worker's stdin ends it."""
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.stdin.close()
            worker.wait()
            worker.stdout.close()


POOL = WorkerPool()


def serve() -> None:
    """A worker's loop: jobs from stdin until it closes; answers (stats, or the ``UserError``
    met) to stdout. Other exceptions end the worker with a traceback on stderr."""
    from sim_pipeline.fetch import fetch_urls

    jobs, answers = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            environment, job = _receive(jobs)
        except EOFError:
            return
        os.environ.clear()
        os.environ.update(environment)
        try:
            urls, store, settings = pickle.loads(job)  # after the environment: S3Store reads it
            result = asyncio.run(fetch_urls(urls, store, settings))
        except UserError as error:
            result = error
        _send(answers, result)
