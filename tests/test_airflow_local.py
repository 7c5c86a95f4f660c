"""`make airflow` for real: the launcher's Airflow runs the DAG through its scheduler.

One launcher (bin/airflow_local.py) serves the whole module: a run triggered over the REST API
completes; clearing join_score re-runs it without changing a row; a two-day backfill through the
`airflow backfill create` CLI scores each day's file once, and clearing a day re-runs it under the
same run id, replacing its rows; the nightly run of a day without a file skips; a run that fails on
its own, and one a person marks failed, close their scoring runs as failed; SIGTERM then stops
every process it started, the scheduler first. The manual run and the backfill share the
scheduler, as they would in production. Store on disk, results in PostgreSQL through
SIM_PIPELINE_DATABASE_URL: the env-var fallback, where test_airflow_dag.py uses connections.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bin.airflow_api import AirflowApi
from tests.airflow_helpers import (
    PYTHON,
    REPO,
    airflow_env,
    free_port,
    run_airflow,
    run_status,
    runs_of_source,
    score_rows,
    without,
    write_pairs,
)
from tests.conftest import ImageServer
from tests.pairs import serve_good_images

DAYS = {"2024-03-01": 3, "2024-03-02": 4}  # nightly input files and their row counts
JOIN = "score_chunk.join_score"


@dataclass
class Live:
    launcher: subprocess.Popen[bytes]
    api: AirflowApi
    env: dict[str, str]
    home: Path
    store: Path
    output: Path
    urls: list[str]
    manual_run: str = ""


def wait_for_line(path: Path, text: str, process: subprocess.Popen[bytes],
                  timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        assert process.poll() is None, f"launcher exited:\n{path.read_text()}"
        time.sleep(0.3)
    raise AssertionError(f"no {text!r} from the launcher in {timeout:.0f} s")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, pg_url: str,
         image_server: ImageServer) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("live")
    home, store, port = root / "airflow", root / "store", free_port()
    env = airflow_env(home, {
        "SIM_PIPELINE_STORE": str(store), "SIM_PIPELINE_DATABASE_URL": pg_url,
        "SIM_PIPELINE_MODEL": str(tiny_model), "SIM_PIPELINE_DEVICE": "cpu",
        "SIM_PIPELINE_CHUNK_SIZE": "3",  # below the form's floor: only the env may go that low
        "SIM_PIPELINE_FETCH_TIMEOUT": "3", "SIM_PIPELINE_ALLOW_HOSTS": image_server.allow_hosts})
    urls = serve_good_images(image_server, 5, prefix="live")
    for day, rows in DAYS.items():
        write_pairs(store / "incoming" / f"{day}.csv", urls[:rows], prefix=f"on {day}, photo")
    output = root / "launcher.out"
    with output.open("wb") as out:
        launcher = subprocess.Popen(
            [PYTHON, "-m", "bin.airflow_local", "--home", str(home),
             "--port", str(port), "--gpu-slots", "2"],  # two cores: two embedding tasks
            env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_line(output, "Airflow is up", launcher)
        live = Live(launcher, AirflowApi(port), {**env, "AIRFLOW_HOME": str(home)}, home,
                    store, output, urls)
        live.api.wait(lambda: live.api.has_dag(), "the dag-processor to parse the DAG", 60)
        # Both start now and share the scheduler, as they would in production.
        live.manual_run = live.api.trigger(
            {"csv_path": str(write_pairs(root / "manual.csv", urls))})
        backfill(live, "--from-date", "2024-03-01", "--to-date", "2024-03-02T02:00:00+00:00")
        yield live
    finally:
        if launcher.poll() is None:  # a failed test left it running: stop it the same way
            launcher.send_signal(signal.SIGTERM)
            launcher.wait(timeout=90)


def task_states(live: Live, run_id: str) -> dict[str, list[str]]:
    states: dict[str, list[str]] = {}
    for ti in live.api.task_instances(run_id):
        states.setdefault(ti["task_id"], []).append(ti["state"])
    return states


def test_a_run_triggered_over_rest_completes_through_the_scheduler(
        live: Live, pg_url: str) -> None:
    run_id = live.manual_run  # {"csv_path": ...} posted as the UI's trigger form does
    assert live.api.wait_for_run(run_id) == "success"
    assert task_states(live, run_id)[JOIN] == ["success", "success"]
    assert [r["row_number"] for r in score_rows(pg_url, run_id)] == list(range(len(live.urls)))
    assert run_status(pg_url, run_id)["status"] == "succeeded"


def test_the_metadata_database_lets_readers_and_the_writer_work_at_once(live: Live) -> None:
    """WAL mode, set on the file by the launcher: a component reading never blocks a write."""
    with contextlib.closing(sqlite3.connect(live.home / "airflow.db")) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_clearing_join_score_reruns_it_and_changes_no_row(live: Live, pg_url: str) -> None:
    run_id = live.manual_run
    assert live.api.wait_for_run(run_id) == "success"
    before = score_rows(pg_url, run_id)
    live.api.clear(run_id, [JOIN])  # and what follows it: finalize
    assert live.api.wait_for_run(run_id) == "success"
    tries = {(ti["task_id"], ti["map_index"]): ti["try_number"]
             for ti in live.api.task_instances(run_id)}
    assert tries[(JOIN, 0)] == tries[(JOIN, 1)] == tries[("finalize", -1)] == 2
    assert tries[("score_chunk.embed_images", 0)] == 1
    after = score_rows(pg_url, run_id)
    assert without(after, "scored_at") == without(before, "scored_at")


def backfill_runs(live: Live) -> dict[str, dict[str, Any]]:
    return {r["dag_run_id"]: r for r in live.api.runs() if r["run_type"] == "backfill"}


def backfill(live: Live, *args: str) -> None:
    """`airflow backfill create` with the launcher's AIRFLOW_HOME; the scheduler runs it.

    The local launcher keeps Airflow's metadata in SQLite, which takes one writer at a time: on a
    busy machine the CLI can lose the race with the scheduler ("database is locked", its whole
    transaction rolled back), so it gets a few more tries.
    """
    command = ["backfill", "create", "--dag-id", "similarity_scoring", *args]
    for _ in range(4):
        try:
            run_airflow(command, live.env)
            return
        except AssertionError as failure:
            if "database is locked" not in str(failure):
                raise
            time.sleep(3)
    run_airflow(command, live.env)


def test_a_two_day_backfill_scores_each_days_file_once(live: Live, pg_url: str) -> None:
    live.api.wait(lambda: len(backfill_runs(live)) == 2, "two backfill runs", timeout=30)
    for run_id in backfill_runs(live):
        assert live.api.wait_for_run(run_id) == "success"
    for day, rows in DAYS.items():
        run_id = f"backfill__{day}T02:00:00+00:00"
        scored = score_rows(pg_url, run_id)
        assert [r["row_number"] for r in scored] == list(range(rows))
        assert all(r["caption"].startswith(f"on {day}") for r in scored)
        assert run_status(pg_url, run_id)["source"].endswith(f"incoming/{day}.csv")


def test_rerunning_a_backfilled_day_replaces_its_rows(live: Live, pg_url: str) -> None:
    """Clearing the whole run re-runs the day under the same run id, which is also what
    `airflow backfill create --reprocess-behavior completed` does to an existing day."""
    run_id = "backfill__2024-03-01T02:00:00+00:00"
    assert live.api.wait_for_run(run_id) == "success"
    before = score_rows(pg_url, run_id)
    live.api.clear(run_id)
    assert live.api.wait_for_run(run_id) == "success"
    tries = {ti["task_id"]: ti["try_number"] for ti in live.api.task_instances(run_id)}
    assert set(tries.values()) == {2}  # every task ran again
    after = score_rows(pg_url, run_id)
    assert without(after, "scored_at") == without(before, "scored_at")
    assert min(r["scored_at"] for r in after) > max(r["scored_at"] for r in before)
    day_file = str(live.store / "incoming" / "2024-03-01.csv")
    assert runs_of_source(pg_url, day_file) == [run_id]  # one run, so one set of rows, per day


def test_the_nightly_run_of_a_day_without_its_file_skips(live: Live, pg_url: str) -> None:
    scheduled = [r for r in live.api.runs() if r["run_type"] == "scheduled"]
    assert scheduled, "the scheduler made no nightly run"  # catchup off: only the latest one
    run_id = scheduled[0]["dag_run_id"]
    assert live.api.wait_for_run(run_id) == "success"
    states = task_states(live, run_id)
    assert states.pop("plan_chunks") == ["skipped"]
    assert all(s == ["skipped"] for s in states.values())
    assert run_status(pg_url, run_id) is None and score_rows(pg_url, run_id) == []
    day = datetime.fromisoformat(scheduled[0]["logical_date"]).astimezone(UTC).date()
    log = next((live.home / "logs").glob(f"dag_id=*/run_id={run_id}/task_id=plan_chunks/*.log"))
    assert f"No nightly input for {day}" in log.read_text()


def results_runs(live: Live) -> str:
    """What `sim-pipeline results runs` prints for the launcher's results database."""
    done = subprocess.run([str(Path(PYTHON).with_name("sim-pipeline")), "results", "runs"],
                          env=live.env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def status_line(live: Live, run_id: str) -> str:
    return next((line for line in results_runs(live).splitlines() if run_id in line), "")


def test_a_run_that_fails_on_its_own_is_marked_failed_within_a_minute(
        live: Live, pg_url: str, tmp_path: Path) -> None:
    """The DAG's on_failure_callback, run by the dag-processor, closes the scoring run."""
    run_id = live.api.trigger({"csv_path": str(write_pairs(tmp_path / "in.csv", live.urls)),
                               "output_path": "/dev/null/scored.csv"})  # finalize cannot write
    assert live.api.wait_for_run(run_id) == "failed"
    live.api.wait(lambda: (run_status(pg_url, run_id) or {}).get("status") == "failed",
                  "the scoring run to be marked failed", timeout=60)
    assert "failed" in status_line(live, run_id)
    # The failed try's log ends with its one sentence (its full traceback is logged at DEBUG: a
    # person's mistake, which the sentence names).
    sentence = ("Cannot write the scored CSV to /dev/null/scored.csv: /dev/null is not a "
                "writable folder; check the trigger form's 'output_path' field.")
    (log,) = (live.home / "logs").glob(f"dag_id=*/run_id={run_id}/task_id=finalize/*.log")
    shown = shown_lines(log)
    assert shown[-1].endswith(sentence), shown[-12:]
    assert f"ERROR {sentence}" in shown, shown[-12:]
    assert not any("Where it failed" in line for line in shown)
    # Airflow's own "Task failed with exception" follows, its traceback only the task runner's
    # frames down to the wrapper: none of the code that failed.
    after = shown[shown.index(f"ERROR {sentence}") + 1:]
    assert after[0] == "ERROR Task failed with exception", after
    assert not [line for line in after if "sim_pipeline/" in line or "runs.py" in line], after


def shown_lines(log: Path) -> list[str]:
    """A task log (JSON lines) as text, the way the UI shows it: ``LEVEL event`` per event, each
    exception's traceback after its event, group markers dropped."""
    lines = []
    for raw in log.read_text().splitlines():
        event = json.loads(raw)
        if str(event.get("event", "")).startswith(("::group::", "::endgroup::")):
            continue
        lines.append(f"{str(event.get('level', '')).upper()} {event.get('event', '')}")
        for error in event.get("error_detail") or []:
            lines += [f"  File {frame.get('filename')}, line {frame.get('lineno')}"
                      for frame in error.get("frames", [])]
            lines.append(f"{error.get('exc_type')}: {error.get('exc_value')}")
    return lines


def test_a_run_marked_failed_by_hand_is_marked_failed_within_a_minute(
        live: Live, pg_url: str, tmp_path: Path) -> None:
    """Airflow calls no DAG callback then; the plugin's listener does the work."""
    run_id = live.api.trigger({"csv_path": str(write_pairs(tmp_path / "in.csv", live.urls))})
    live.api.wait(lambda: run_status(pg_url, run_id) is not None, "the run to be planned")
    live.api.call("PATCH", live.api.run_path(run_id), {"state": "failed"})
    live.api.wait(lambda: run_status(pg_url, run_id)["status"] == "failed",
                  "the scoring run to be marked failed", timeout=60)
    assert live.api.call("GET", live.api.run_path(run_id))["state"] == "failed"
    assert "failed" in status_line(live, run_id)


def test_sigterm_stops_the_scheduler_first_then_every_process(live: Live) -> None:
    pids = json.loads((live.home / "pids.json").read_text())
    live.launcher.send_signal(signal.SIGTERM)
    assert live.launcher.wait(timeout=90) == 0
    text = live.output.read_text()
    assert text.index("stopped scheduler") < text.index("stopped dag-processor, api-server")
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # neither the component nor anything left in its process group
    assert processes_of(live.home) == []  # nor any task or worker process it spawned


def processes_of(home: Path) -> list[int]:
    """Processes whose environment names this AIRFLOW_HOME: everything the launcher started."""
    marker = f"AIRFLOW_HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_a_port_in_use_is_refused_in_one_sentence_before_anything_starts(
        tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run([PYTHON, "-m", "bin.airflow_local", "--port",
                               str(port), "--home", str(tmp_path / "home")],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"Port {port} on 127.0.0.1 is in use; pick another with "
                                   "--port (make airflow AIRFLOW_PORT=...).")
    assert not (tmp_path / "home").exists()  # nothing was prepared or started
