"""The score_drift DAG under real Airflow 3: it reads the Asset event of a scoring run.

``similarity_scoring`` scores day 1's input, then day 2's (the same pairs, half their URLs now
answering 404), each by ``dag.test()``; after each, ``score_drift`` runs by ``dag.test()`` and
reads the latest event of the scores Asset that the scoring run's ``finalize`` emitted. The
results database is PostgreSQL, reached through the Airflow connection; the store a folder.
Random-weight CLIP: meaningless scores, real stages.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.airflow_helpers import MARKER, PYTHON, REPO, airflow_env, run_airflow, write_pairs
from tests.conftest import ImageServer, Route
from tests.pairs import serve_good_images
from tests.test_airflow_dag import postgres_connection

ROWS = 10
SCORING, DRIFT = "similarity_scoring", "score_drift"


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, pg_url: str,
            image_server: ImageServer) -> dict[str, Any]:
    home = tmp_path_factory.mktemp("drift-airflow-home")
    env = airflow_env(home, {
        "AIRFLOW_CONN_SIM_PIPELINE_RESULTS": postgres_connection(pg_url),
        "SIM_PIPELINE_STORE": str(home / "store"), "SIM_PIPELINE_MODEL": str(tiny_model),
        "SIM_PIPELINE_DEVICE": "cpu", "SIM_PIPELINE_BATCH_SIZE": "8",
        "SIM_PIPELINE_FETCH_TIMEOUT": "3", "SIM_PIPELINE_ALLOW_HOSTS": image_server.allow_hosts,
    })
    run_airflow(["db", "migrate"], env)
    urls = serve_good_images(image_server, ROWS, prefix="drift-dag")
    name = f"pairs-{uuid.uuid4().hex[:6]}.csv"  # the database is shared: no earlier run of it
    day1 = write_pairs(home / "day1" / name, urls)
    failing = [image_server.add(f"/drift-dag-gone/{i}.jpg", Route(404, b"gone", "text/plain"))
               if i % 2 else u for i, u in enumerate(urls)]
    day2 = write_pairs(home / "day2" / name, failing)
    runs = [
        {"dag_id": SCORING, "logical_date": "2025-01-01T00:00:00+00:00",
         "conf": {"csv_path": str(day1)}},
        {"dag_id": DRIFT, "logical_date": "2025-01-01T06:00:00+00:00"},
        {"dag_id": SCORING, "logical_date": "2025-01-02T00:00:00+00:00",
         "conf": {"csv_path": str(day2)}},
        {"dag_id": DRIFT, "logical_date": "2025-01-02T06:00:00+00:00"},
    ]
    done = subprocess.run([PYTHON, "-m", "tests.drift_airflow_helper", json.dumps(runs)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARKER)]
    assert done.returncode == 0 and lines, f"{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    return {**json.loads(lines[-1][len(MARKER):]), "log": done.stdout + done.stderr}


def test_finalize_emits_the_scores_asset_with_the_runs_summary(outcome: dict[str, Any]) -> None:
    first, _, second, _ = outcome["runs"]
    assert first["state"] == second["state"] == "success"
    scores = [e for e in outcome["asset_events"]
              if e["uri"] == "sim-pipeline://results/similarity_scores"]
    assert [e["run_id"] for e in scores] == [first["run_id"], second["run_id"]]
    day1, day2 = (e["extra"] for e in scores)
    assert day1["run_id"] == first["run_id"] and day1["rows"] == ROWS
    assert day1["error_shares"] == {} and day2["error_shares"] == {"http_404": 0.5}
    assert set(day1["quantiles"]) == {"p1", "p5", "p50", "p95", "p99"}
    assert day1["quantiles"]["p1"] <= day1["quantiles"]["p50"] <= day1["quantiles"]["p99"]
    assert day1["model"].endswith("tiny-clip0")
    outputs = [e for e in outcome["asset_events"] if e["uri"].startswith("file://")]
    assert [e["extra"]["run_id"] for e in outputs] == [first["run_id"], second["run_id"]]
    assert all(e["uri"].endswith("_scored.csv") for e in outputs)


def test_score_drift_reads_the_event_and_fails_its_check_on_an_alert(
        outcome: dict[str, Any], pg_url: str) -> None:
    first, quiet, second, alarmed = outcome["runs"]
    assert quiet["state"] == "success" and quiet["compare"]["verdict"] == "none"
    assert quiet["compare"]["run_id"] == first["run_id"]  # nothing earlier to compare with
    assert alarmed["state"] == "failed"
    assert alarmed["tasks"] == {"compare[-1]": "success", "check[-1]": "failed"}
    found = alarmed["compare"]
    assert found["run_id"] == second["run_id"] and found["against_run_id"] == first["run_id"]
    assert found["verdict"] == "alert" and found["error_shares"]["http_404"] == [0.5, 0.0]
    assert f"ALERT: run {second['run_id']} against {first['run_id']}" in outcome["log"]
    with sa.create_engine(pg_url).connect() as conn:
        recorded = conn.execute(sa.text(
            "SELECT verdict FROM score_drift WHERE run_id = :r AND against_run_id = :a"),
            {"r": second["run_id"], "a": first["run_id"]}).scalar_one()
    assert recorded == "alert"


def test_score_drift_is_scheduled_on_the_scores_asset(outcome: dict[str, Any]) -> None:
    assert outcome["drift_schedule"] == ["sim-pipeline://results/similarity_scores"]
