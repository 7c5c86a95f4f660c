"""One stage of a run as a call that takes and returns small descriptors (run id, chunk index,
counts): the boundary of the CLI's ``stage`` command, Kubernetes pods and Airflow tasks.

Data never crosses it; it stays in the object store and the results database. Each call goes
through the run's lifecycle (``lifecycle.Run``), so timings, repairs and run status are kept the
same way as in the in-process runner.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from sim_pipeline.core.config import Settings
from sim_pipeline.core.errors import UserError
from sim_pipeline.core.layout import FINALIZE, PLAN
from sim_pipeline.runners.lifecycle import Run
from sim_pipeline.stages.registry import CHUNK_STAGES
from sim_pipeline.stages.score import ScoredChunk


def plan(settings: Settings, input_path: str | Path, source: str | None = None,
         run_id: str | None = None) -> dict[str, Any]:
    """Split the input into chunks and open the run; the chunks' descriptors come back."""
    planned = Run.open(settings).plan(input_path, source, run_id)
    return {"run_id": planned.run_id, "rows": planned.rows,
            "chunks": [c.to_dict() for c in planned.chunks]}


def chunk_stage(stage: str, settings: Settings, run_id: str | None, index: int
                ) -> dict[str, Any]:
    """One per-chunk stage on chunk ``index`` of the run; its counts come back, with the
    objects it repaired by kind (``repaired``)."""
    run = Run.open(settings)
    counts = _counts(run.run_stage(stage, run.chunk(run_id, index)))
    return {**counts, "repaired": dict(run.repaired)}


def finalize(settings: Settings, run_id: str | None, output: str | Path | None = None
             ) -> dict[str, Any]:
    """Write the scored CSV and the report, and close the run as succeeded."""
    run = Run.open(settings)
    done = run.finalize(run.load_plan(run_id), output)
    return {"run_id": done.run_id, "output": str(done.output), "report": str(done.report),
            "rows": done.rows, "repaired": dict(run.repaired)}


def fail(settings: Settings, run_id: str, failure: str | None = None,
         source: str | None = None) -> None:
    """Close the run as failed, with its one sentence if known (best effort); with ``source``,
    a run that never planned gets its row too."""
    Run.open(settings).fail(run_id, failure, source)


def _counts(result: Any) -> dict[str, Any]:
    """A stage's result as plain counts (XCom-sized)."""
    if isinstance(result, ScoredChunk):  # join-score's rows
        return {"rows": len(result), "ok": result.ok}
    if hasattr(result, "to_dict"):
        return result.to_dict()
    return dataclasses.asdict(result)


def stage_by_name(name: str, settings: Settings, run_id: str | None = None,
                  input_path: str | None = None, chunk: int | None = None,
                  output: str | None = None) -> dict[str, Any]:
    """Any stage by name: what ``sim-pipeline stage NAME`` runs."""
    if name == PLAN:
        if not input_path:
            raise UserError("The plan stage needs --input PATH.")
        return plan(settings, input_path, run_id=run_id)
    if name == FINALIZE:
        return finalize(settings, run_id, output)
    if name not in CHUNK_STAGES:
        raise UserError(f"Unknown stage {name!r}: use one of {', '.join(CHUNK_STAGES)}.")
    if chunk is None:
        raise UserError(f"The {name} stage needs --chunk INDEX.")
    return chunk_stage(name, settings, run_id, chunk)
