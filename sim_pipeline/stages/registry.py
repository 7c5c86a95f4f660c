"""The per-chunk stages, declared once: what each is called, the function that runs it, and the
stages whose output it reads.

The CLI's order, the lifecycle's healing (which stages to run again when an input is missing or
damaged) and the DAG's edges are read from ``CHUNK_STAGES``; nothing else records the graph.
Every stage is called the same way: ``stage.run(chunk, store, settings, results)``. Each imports
its module when it runs, so the DAG file reads the graph at parse time without loading them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sim_pipeline.core.layout import EMBED_IMAGES, EMBED_TEXTS, FETCH_IMAGES, JOIN_SCORE, ChunkRef

if TYPE_CHECKING:
    from sim_pipeline.core.config import Settings
    from sim_pipeline.core.store import ObjectStore
    from sim_pipeline.results.db import ResultsDB
    from sim_pipeline.stages.embed.sets import EmbedStats
    from sim_pipeline.stages.fetch.records import FetchStats
    from sim_pipeline.stages.score import ScoredChunk

StageRun = Callable[[ChunkRef, "ObjectStore", "Settings", "ResultsDB | None"], Any]


@dataclass(frozen=True)
class Stage:
    """One per-chunk stage: reads the outputs of ``needs`` from the store, writes its own."""

    name: str
    run: StageRun
    needs: tuple[str, ...] = ()


def fetch_images(chunk: ChunkRef, store: ObjectStore, settings: Settings,
                 results: ResultsDB | None) -> FetchStats:
    from sim_pipeline.stages.fetch.chunk import fetch_chunk

    return fetch_chunk(chunk, store, settings)


def embed_images(chunk: ChunkRef, store: ObjectStore, settings: Settings,
                 results: ResultsDB | None) -> EmbedStats:
    from sim_pipeline.stages.embed.images import embed_images_chunk

    return embed_images_chunk(chunk, store, settings)


def embed_texts(chunk: ChunkRef, store: ObjectStore, settings: Settings,
                results: ResultsDB | None) -> EmbedStats:
    from sim_pipeline.stages.embed.texts import embed_texts_chunk

    return embed_texts_chunk(chunk, store, settings)


def join_score(chunk: ChunkRef, store: ObjectStore, settings: Settings,
               results: ResultsDB | None) -> ScoredChunk:
    from sim_pipeline.stages.score import join_score_chunk

    return join_score_chunk(chunk, store, settings, results)


# In an order that runs every stage after the stages it needs.
CHUNK_STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage(FETCH_IMAGES, fetch_images),
    Stage(EMBED_IMAGES, embed_images, needs=(FETCH_IMAGES,)),
    Stage(EMBED_TEXTS, embed_texts),
    Stage(JOIN_SCORE, join_score, needs=(EMBED_IMAGES, EMBED_TEXTS)),
)}
