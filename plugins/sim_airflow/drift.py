"""The ``score_drift`` DAG's task bodies: which run to compare, the comparison, the verdict.

The run comes from the Asset event that scheduled the DAG run (``triggering_asset_events``), or,
for a manual run, from the ``run_id`` param or the latest event of the scores Asset (the task's
inlet). The comparison is the library's (``results.drift``): it is recorded in the results
database's ``score_drift`` table beside the run, and its figures come back as the task's XCom.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from airflow.sdk import Context, get_current_context
from airflow.sdk.exceptions import AirflowFailException

from sim_airflow.assets import SCORES
from sim_airflow.settings import task_settings

log = logging.getLogger(__name__)


def scored_run(context: Context) -> tuple[str, Mapping[str, Any]]:
    """The run id to compare and the Asset event's extra it came with (empty when given)."""
    given = (context["params"].get("run_id") or "").strip()
    if given:
        return given, {}
    events = list(context["triggering_asset_events"].get(SCORES, []))
    if not events:
        events = list(context["inlet_events"][SCORES][-1:])
    if not events:
        raise AirflowFailException("No scores Asset event to compare: no similarity_scoring run "
                                   'has finished yet; trigger with {"run_id": "..."}.')
    extra = dict(events[-1].extra)
    return str(extra["run_id"]), extra


def compare_run() -> dict[str, Any]:
    """Measure and record the scored run's drift; its figures (or why there are none)."""
    from sim_pipeline.core.errors import UserError
    from sim_pipeline.results.db import ResultsDB
    from sim_pipeline.results.drift import drift_of_run

    context = get_current_context()
    run_id, extra = scored_run(context)
    log.info("Comparing run %s (%s rows, model %s, score quantiles %s).", run_id,
             extra.get("rows", "?"), extra.get("model", "?"), extra.get("quantiles", "?"))
    settings = task_settings({})
    against = (context["params"].get("against") or "").strip() or None
    try:
        found = drift_of_run(ResultsDB(settings.database_url), run_id, settings, against)
    except UserError as error:
        log.info("No drift figures: %s", error)
        return {"run_id": run_id, "verdict": "none", "headline": str(error)}
    log.info(found.headline())
    return {**found.to_json(), "headline": found.headline()}


def check_verdict(found: Mapping[str, Any]) -> str:
    """Fail on an alert, so Airflow's failure channels (email, callbacks) carry it."""
    if found["verdict"] == "alert":
        raise AirflowFailException(found["headline"])
    log.info(found["headline"])
    return str(found["verdict"])
