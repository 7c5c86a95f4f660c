"""The in-process runner: every stage over every chunk, for the CLI and one-off files.

Airflow runs the same stage functions as mapped tasks instead; this module is only the loop.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sim_pipeline.core.config import Settings
from sim_pipeline.core.faults import fault_sentence
from sim_pipeline.core.layout import EMBED_IMAGES, EMBED_TEXTS, FETCH_IMAGES, JOIN_SCORE
from sim_pipeline.results.report import report_path
from sim_pipeline.runners.lifecycle import Run
from sim_pipeline.stages.embed.encoders import encoder_for
from sim_pipeline.stages.embed.error_bound import ErrorBound
from sim_pipeline.stages.embed.model import release_encoders
from sim_pipeline.stages.fetch.chunk import fetch_processes
from sim_pipeline.stages.fetch.records import FetchStats
from sim_pipeline.stages.finalize import default_output_path
from sim_pipeline.stages.plan import RunPlan
from sim_pipeline.stages.registry import CHUNK_STAGES
from sim_pipeline.stages.score import ScoredChunk


@dataclass
class RunSummary:
    run_id: str
    output: Path
    database: str
    rows: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    fetch: FetchStats = field(default_factory=FetchStats)
    seconds: float = 0.0
    repaired: Counter[str] = field(default_factory=Counter)  # damaged objects recomputed
    error_bound: ErrorBound | None = None  # quantised backends: scores vs fp32's

    def add(self, scored: ScoredChunk) -> None:
        counts = scored.error_counts()
        self.rows += len(scored)
        self.ok += counts.pop(None, 0)
        self.errors.update(counts)

    def render(self) -> str:
        errors = ", ".join(f"{code} {n}" for code, n in sorted(self.errors.items())) or "none"
        rate = self.rows / self.seconds if self.seconds else 0.0
        return "\n".join([
            f"run       {self.run_id}",
            f"rows      {self.rows}: {self.ok} scored, {self.rows - self.ok} errors",
            f"errors    {errors}",
            self.images_line(),
            *self.repairs_line(),
            *([f"int8      {self.error_bound.render()}"] if self.error_bound else []),
            f"time      {self.seconds:.1f} s ({rate:.1f} rows/s)",
            f"output    {self.output}",
            f"report    {report_path(self.output)}",
            f"results   {self.database} (similarity_scores, run_id={self.run_id})",
        ])

    def repairs_line(self) -> list[str]:
        if not self.repaired:
            return []
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.repaired.items()))
        return [f"repaired  {sum(self.repaired.values())} damaged or missing objects "
                f"recomputed ({kinds})"]

    def images_line(self) -> str:
        fetch = self.fetch
        latency = ""
        if fetch.attempted:
            p50, p95 = fetch.latency_seconds(0.5), fetch.latency_seconds(0.95)
            latency = f", latency p50 {p50:.3f} s p95 {p95:.3f} s"
        return (f"images    {fetch.attempted} downloaded ({fetch.ok} ok, {fetch.retries} retries, "
                f"{fetch.bytes / 1e6:.1f} MB{latency}), {fetch.cached} from cache")

    def render_fetch(self) -> str:
        """The summary of a fetch-only run (``sim-pipeline fetch``)."""
        errors = ", ".join(f"{code} {n}" for code, n in sorted(self.fetch.errors.items()))
        rate = self.fetch.attempted / self.seconds if self.seconds else 0.0
        return "\n".join([
            f"run       {self.run_id} (plan and fetch only)",
            f"rows      {self.rows}",
            self.images_line(),
            f"errors    {errors or 'none'}",
            f"time      {self.seconds:.1f} s ({rate:.1f} images/s)",
        ])


def over_chunks(run: Run, stage: str, plan: RunPlan, progress: bool) -> Iterator[Any]:
    """Run one stage over every chunk in order, with a progress bar in rows."""
    with tqdm(total=plan.rows, unit="row", desc=f"{stage:>12}", disable=not progress) as bar:
        for chunk in plan.chunks:
            yield run.run_stage(stage, chunk)
            bar.update(chunk.rows)


def fetch_in_worker_processes(settings: Settings, plan: RunPlan) -> bool:
    """Whether the fetch stage downloads from worker processes. Only then does the text tower
    run beside it: imports, loading and tokenising hold this process's GIL for long stretches,
    which would stall downloads made here into spurious timeouts."""
    return any(fetch_processes(settings, chunk.rows) > 1 for chunk in plan.chunks)


def embed_texts_then_load_image_tower(run: Run, plan: RunPlan) -> None:
    """Embed-texts over every chunk, then, if it needed the model, the image tower loaded for
    embed-images: both off the critical path while the images download (fetching waits on the
    network, not the CPU). Only one tower is in memory at a time, and a run whose vectors are
    all cached still loads no model."""
    computed = sum(stats.computed for stats in over_chunks(run, EMBED_TEXTS, plan, False))
    release_encoders()
    if computed and not run.settings.inference_url:
        encoder_for(run.settings, "image")


def score_csv(source: str | Path, settings: Settings, output: str | Path | None = None,
              progress: bool = True, run_id: str | None = None) -> RunSummary:
    """Score a CSV end to end: scored CSV next to it, rows in the results table.

    Stage by stage over all chunks (in the registry's order), so only one model tower is in
    memory at a time; embed-texts runs beside fetch-images when worker processes download
    (large chunks).
    """
    started = time.monotonic()
    source = Path(source)
    run = Run.open(settings)
    plan = run.plan(source, run_id=run_id)  # a refused run is recorded failed
    summary = RunSummary(plan.run_id, Path(output or default_output_path(source)),
                         run.results.shown_url)  # type: ignore[union-attr]
    try:
        with ThreadPoolExecutor(1) as beside:
            texts = (beside.submit(embed_texts_then_load_image_tower, run, plan)
                     if fetch_in_worker_processes(settings, plan) else None)
            for stage in CHUNK_STAGES:
                if stage == EMBED_TEXTS and texts is not None:
                    continue  # ran beside fetch-images
                if stage == EMBED_IMAGES and texts is not None:
                    texts.result()
                for result in over_chunks(run, stage, plan, progress):
                    if stage == FETCH_IMAGES:
                        summary.fetch.add(result)
                    elif stage == JOIN_SCORE:
                        summary.add(result)
                if stage != FETCH_IMAGES:  # the text side may be loading the image tower
                    release_encoders()
        summary.error_bound = run.finalize(plan, summary.output).error_bound
    except BaseException as error:
        run.fail(plan.run_id, fault_sentence(error))
        raise
    summary.repaired = run.repaired
    summary.seconds = time.monotonic() - started
    return summary


def fetch_csv(source: str | Path, settings: Settings, progress: bool = True,
              run_id: str | None = None) -> RunSummary:
    """Plan and fetch only: warms the image cache ahead of a GPU window; writes no results."""
    started = time.monotonic()
    run = Run.open(settings, record=False)
    plan = run.plan(source, run_id=run_id)
    summary = RunSummary(plan.run_id, default_output_path(source), "none", rows=plan.rows)
    for fetched in over_chunks(run, FETCH_IMAGES, plan, progress):
        summary.fetch.add(fetched)
    summary.seconds = time.monotonic() - started
    return summary
