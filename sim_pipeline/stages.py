"""Each stage as a call that takes and returns small descriptors (run id, chunk index, counts).

This is the boundary every runner uses: the CLI's ``stage`` command, Kubernetes pods and Airflow
tasks. Data never crosses it; it stays in the object store and the results database.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sim_pipeline.config import Settings
from sim_pipeline.embed import embed_images_chunk, embed_texts_chunk
from sim_pipeline.errors import UserError
from sim_pipeline.fetch import fetch_chunk
from sim_pipeline.finalize import default_output_path, write_scored_csv
from sim_pipeline.layout import ChunkRef
from sim_pipeline.plan import load_plan, plan_input
from sim_pipeline.report import write_report
from sim_pipeline.results_db import ResultsDB, timed_stage
from sim_pipeline.score import join_score_chunk
from sim_pipeline.store import open_store


@timed_stage("plan")
def plan(settings: Settings, input_path: str | Path, source: str | None = None
         ) -> dict[str, Any]:
    """Split the input into chunks and open the run in the results table.

    ``source`` is what the run records as its input when ``input_path`` is a local copy of it
    (an s3:// object downloaded for planning, say).
    """
    run = plan_input(input_path, open_store(settings.store), settings)
    ResultsDB(settings.database_url).start_run(run.run_id, source or str(input_path),
                                               settings.model, run.rows, run.columns,
                                               run.delimiter)
    return {"run_id": run.run_id, "rows": run.rows,
            "chunks": [c.to_dict() for c in run.chunks]}


def chunk_ref(settings: Settings, index: int) -> ChunkRef:
    if settings.run_id is None:
        raise UserError("Per-chunk stages need the run id: pass --run-id or SIM_PIPELINE_RUN_ID.")
    chunks = load_plan(open_store(settings.store), settings.run_id).chunks
    if not 0 <= index < len(chunks):
        raise UserError(f"Run {settings.run_id} has {len(chunks)} chunks, none numbered {index}.")
    return chunks[index]


@timed_stage("fetch-images", per_chunk=True)
def fetch_images(settings: Settings, index: int) -> dict[str, Any]:
    return fetch_chunk(chunk_ref(settings, index), open_store(settings.store), settings).to_dict()


@timed_stage("embed-images", per_chunk=True)
def embed_images(settings: Settings, index: int) -> dict[str, Any]:
    stats = embed_images_chunk(chunk_ref(settings, index), open_store(settings.store), settings)
    return stats.__dict__


@timed_stage("embed-texts", per_chunk=True)
def embed_texts(settings: Settings, index: int) -> dict[str, Any]:
    stats = embed_texts_chunk(chunk_ref(settings, index), open_store(settings.store), settings)
    return stats.__dict__


@timed_stage("join-score", per_chunk=True)
def join_score(settings: Settings, index: int) -> dict[str, Any]:
    scored = join_score_chunk(chunk_ref(settings, index), open_store(settings.store), settings,
                              ResultsDB(settings.database_url))
    return {"rows": len(scored), "ok": sum(1 for s in scored if s.error is None)}


@timed_stage("finalize")
def finalize(settings: Settings, output: str | Path | None = None) -> dict[str, Any]:
    """Write the scored CSV, close the run as succeeded, and write its report beside the CSV."""
    if settings.run_id is None:
        raise UserError("finalize needs the run id: pass --run-id or SIM_PIPELINE_RUN_ID.")
    run = load_plan(open_store(settings.store), settings.run_id)
    path = write_scored_csv(run, open_store(settings.store), settings,
                            output or default_output_path(run.source))
    ResultsDB(settings.database_url).finish_run(settings.run_id, "succeeded")
    report = write_report(settings.run_id, settings, report_path(path))
    return {"run_id": settings.run_id, "output": str(path), "report": str(report),
            "rows": run.rows}


def report_path(scored_csv: Path) -> Path:
    """``pairs_scored.csv`` -> ``pairs_scored_report.html``, beside it."""
    return scored_csv.with_name(f"{scored_csv.stem}_report.html")


PER_CHUNK = {"fetch-images": fetch_images, "embed-images": embed_images,
             "embed-texts": embed_texts, "join-score": join_score}


def run_stage(name: str, settings: Settings, input_path: str | None = None,
              chunk: int | None = None, output: str | None = None) -> dict[str, Any]:
    if name == "plan":
        if not input_path:
            raise UserError("The plan stage needs --input PATH.")
        return plan(settings, input_path)
    if name == "finalize":
        return finalize(settings, output)
    if chunk is None:
        raise UserError(f"The {name} stage needs --chunk INDEX.")
    return PER_CHUNK[name](settings, chunk)
