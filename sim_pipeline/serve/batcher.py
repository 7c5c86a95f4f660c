"""Dynamic micro-batching: items from concurrent requests share one model forward pass.

A request's items are submitted one by one as they become ready (fetched, decoded), so an image
that arrives early never waits for a slow download of the same or another request. A collector
task on the event loop takes the first waiting item, waits at most ``max_wait`` for company (or
until ``max_batch`` items wait), and runs the batch on the inference thread; meanwhile the next
batch gathers, so under load batches fill up by themselves. The event loop never runs the model.
An item whose request was cancelled (its client left) is dropped before it costs inference.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

from sim_pipeline.serve.metrics import ServeMetrics

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """``await submit(item)`` answers ``work(batch)[i]`` for the item's place ``i`` in a batch."""

    def __init__(self, tower: str, work: Callable[[list[T]], Sequence[R]], executor: Executor,
                 metrics: ServeMetrics, max_batch: int, max_wait_ms: float) -> None:
        self.tower, self.work, self.executor, self.metrics = tower, work, executor, metrics
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self._waiting: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._arrived = asyncio.Event()
        self._collector: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._collector = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        """After the server has drained its requests: nothing waits any more."""
        if self._collector is not None:
            self._collector.cancel()
            await asyncio.gather(self._collector, return_exceptions=True)

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        self._depth()
        self._arrived.set()
        return await future  # cancelled with its request: the collector then skips it

    def _depth(self) -> None:
        self.metrics.queue_depth.labels(self.tower).set(len(self._waiting))

    async def _collect(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._waiting:
                batch = await self._next_batch()
                if batch:
                    await self._run(batch)

    async def _next_batch(self) -> list[tuple[T, asyncio.Future[R]]]:
        """Up to ``max_batch`` live items, waiting at most ``max_wait`` after the first."""
        deadline = time.monotonic() + self.max_wait
        while len(self._waiting) < self.max_batch and (left := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                break
        batch: list[tuple[T, asyncio.Future[R]]] = []
        while self._waiting and len(batch) < self.max_batch:
            item, future = self._waiting.popleft()
            if not future.done():  # done: cancelled by a client that left
                batch.append((item, future))
        self._depth()
        return batch

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self.executor, self.work,
                                                 [item for item, _ in batch])
        except Exception as error:  # the whole batch failed: every caller hears why
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        self.metrics.batch_size.labels(self.tower).observe(len(batch))
        self.metrics.inference.labels(self.tower).observe(time.perf_counter() - started)
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
