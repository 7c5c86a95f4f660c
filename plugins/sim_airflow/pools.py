"""The one table of the DAG's slots: pools, worker queues, their concurrency, executor parallelism.

Every task runs in a pool, and every pool belongs to one executor queue, so a queue's worker
concurrency is the sum of its pools and the executor's parallelism the sum of all pools. Then
fetch tasks can never fill the executor while an inference slot is free (the fetch pools are
the fetch queue's alone), and the inference capacity is exactly what its worker runs.
``bin/stack.py`` starts the workers and sets parallelism from this table, ``make airflow`` sets
its parallelism from it, and tests/test_compose.py checks docker-compose.yaml against it.

Kept free of imports so the launchers can read it without importing Airflow.
"""

from __future__ import annotations

from dataclasses import dataclass

GPU_POOL = "gpu"
FETCH_POOL = "image_fetch"
CHUNK_POOL = "chunk_work"
FETCH_QUEUE, INFERENCE_QUEUE = "fetch", "inference"


@dataclass(frozen=True)
class Pool:
    """One pool: its slots, the queue (and so the worker) its tasks run on, and what it is for."""

    slots: int
    queue: str
    description: str


SLOTS: dict[str, Pool] = {
    GPU_POOL: Pool(2, INFERENCE_QUEUE, "Concurrent CLIP inference tasks (embed_images, "
                   "embed_texts); the inference worker runs exactly this many"),
    FETCH_POOL: Pool(2, FETCH_QUEUE, "Concurrent image download tasks (fetch_images)"),
    CHUNK_POOL: Pool(2, FETCH_QUEUE, "Concurrent plan, join-score and finalize tasks"),
}


def sized(gpu_slots: int | None = None) -> dict[str, Pool]:
    """The table with the ``gpu`` pool resized (``SIM_STACK_GPU_SLOTS``, ``--gpu-slots``)."""
    if gpu_slots is None:
        return dict(SLOTS)
    if gpu_slots < 1:
        raise ValueError("the gpu pool needs at least one slot")
    gpu = SLOTS[GPU_POOL]
    return {**SLOTS, GPU_POOL: Pool(gpu_slots, gpu.queue, gpu.description)}


def queue_concurrency(pools: dict[str, Pool] | None = None) -> dict[str, int]:
    """Each queue's worker concurrency: the slots of its pools."""
    concurrency: dict[str, int] = {}
    for pool in (pools or SLOTS).values():
        concurrency[pool.queue] = concurrency.get(pool.queue, 0) + pool.slots
    return concurrency


def parallelism(pools: dict[str, Pool] | None = None) -> int:
    """The executor's parallelism: every pool's slots, so no pooled task waits on the executor."""
    return sum(pool.slots for pool in (pools or SLOTS).values())


# ``{name: (slots, description)}``: what ``airflow pools import`` and Compose's init create.
POOLS = {name: (pool.slots, pool.description) for name, pool in SLOTS.items()}
