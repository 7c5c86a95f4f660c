"""score_drift: did the scores of the latest similarity_scoring run move, and why.

```
similarity_scoring ── finalize ──(Asset: results table)──> compare ──> check
```

Scheduled on the scores Asset that ``similarity_scoring``'s last task emits: each finished scoring
run is compared with the previous succeeded run of the same input name (else the pinned
``SIM_PIPELINE_DRIFT_REFERENCE``): PSI, Kolmogorov-Smirnov, Wasserstein over the reference's spread,
each error code's share, the canary pairs (``sim-pipeline results drift``). ``compare`` records the
verdict in the results database's ``score_drift`` table; ``check`` fails on an alert, so Airflow's
usual failure channels (email, callbacks) carry it, its message the verdict line. Trigger it by
hand with ``{"run_id": "...", "against": "..."}``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from airflow.sdk import Param, dag, task
from sim_airflow.assets import SCORES

Figures = dict[str, Any]


@task(inlets=[SCORES])
def compare() -> Figures:
    from sim_airflow.drift import compare_run

    return compare_run()


@task
def check(found: Figures) -> str:
    from sim_airflow.drift import check_verdict

    return check_verdict(found)


@dag(schedule=[SCORES], start_date=datetime(2024, 1, 1, tzinfo=UTC), catchup=False,
     tags=["sim-pipeline"], doc_md=__doc__, params={
         "run_id": Param("", type="string", description="the scoring run to compare (default: "
                         "the one whose Asset event scheduled this run)"),
         "against": Param("", type="string", description="the reference run (default: the "
                          "previous succeeded run of the same input name)")})
def score_drift() -> None:
    check(compare())


score_drift()
