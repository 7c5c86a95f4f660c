"""The scoring DAG's Assets: what its last task announces, and what ``score_drift`` waits for.

``finalize`` emits an event on ``SCORES`` (the results table) and, through the alias
``SCORED_OUTPUTS``, on the run's scored CSV (``file://`` or ``s3://``, one Asset per output). Each
event's ``extra`` carries what a consumer needs without reading the table: the run id, its rows,
each error code's share, the score quantiles (p1, p5, p50, p95, p99) and the model. ``score_drift``
is scheduled on ``SCORES``. Imported at parse time: nothing heavy here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset, AssetAlias, Context

if TYPE_CHECKING:
    from sim_pipeline.core.config import Settings

SCORES = Asset(name="sim_pipeline_similarity_scores",
               uri="sim-pipeline://results/similarity_scores")
SCORED_OUTPUTS = AssetAlias(name="sim_pipeline_scored_outputs")
OUTLETS = [SCORES, SCORED_OUTPUTS]


def output_uri(output: str) -> str:
    """The scored CSV as an Asset URI: ``s3://`` as given, a local path as ``file://``."""
    return output if output.startswith("s3://") else Path(output).resolve().as_uri()


def emit_scored(context: Context, settings: Settings, finished: Mapping[str, Any]) -> dict[
        str, Any]:
    """Attach the finished run's summary to the task's outlet events; the summary back."""
    from sim_pipeline.results.db import ResultsDB
    from sim_pipeline.results.drift import run_summary

    extra = {**run_summary(ResultsDB(settings.database_url), finished["run_id"]),
             "output": finished["output"]}
    events = context["outlet_events"]
    events[SCORES].extra = extra
    events[SCORED_OUTPUTS].add(Asset(output_uri(finished["output"])), extra=extra)
    return extra
