"""The similarity_scoring DAG under real Airflow 3: dag.test() runs, configured as in production.

The metadata database is SQLite in a temporary AIRFLOW_HOME; the object store is S3 (SeaweedFS on
loopback) and the results database PostgreSQL, both reached only through Airflow connections. One
process runs the dag.test() runs in turn (torch loads once): a manual run of an s3:// input over
three chunks, a second run of the same conf, the nightly run of a day whose input exists and one
of a day whose input is missing, an empty input, a missing input, an input without a caption
column and a model that does not exist. SIM_PIPELINE_CHUNK_SIZE is 1 and max_map_length 3, so
every run must grow its chunks to stay within three.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
import sqlalchemy as sa

from tests.airflow_helpers import (
    airflow_env,
    helper,
    helper_with_output,
    run_airflow,
    run_status,
    score_rows,
    write_pairs,
)
from tests.conftest import ImageServer, Route
from tests.pairs import serve_good_images
from tests.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedFS

pytest_plugins = ["tests.plugin_s3"]

ROWS = 10  # grown from SIM_PIPELINE_CHUNK_SIZE=1 to three chunks: 4 + 4 + 2
NIGHTLY_ROWS = 5  # planned with SIM_PIPELINE_CHUNK_SIZE=1, that would be 5 chunks: over the limit
MAX_MAP_LENGTH = 3
FIRST, SECOND, NIGHTLY, MISSING, EMPTY, WRONG_PATH, NO_CAPTION, NO_MODEL, NO_OUTPUT = range(9)
MAPPED = ("score_chunk.fetch_images", "score_chunk.embed_images", "score_chunk.embed_texts",
          "score_chunk.join_score")


@dataclass
class Runs:
    bag: dict[str, Any]  # the DagBag's view, taken before any task ran in that process
    runs: list[dict[str, Any]]
    output: str  # the process's output: dag.test prints task logs


def postgres_connection(pg_url: str) -> str:
    """The results database as an Airflow connection in JSON, the form AIRFLOW_CONN_* accepts."""
    url = sa.make_url(pg_url)
    return json.dumps({"conn_type": "postgres", "host": url.host, "port": url.port,
                       "login": url.username, "schema": url.database})


def aws_connection(server: SeaweedFS) -> str:
    """The store's S3 endpoint and keys as an aws connection, the endpoint in its extras."""
    return json.dumps({"conn_type": "aws", "login": ACCESS_KEY, "password": SECRET_KEY,
                       "extra": {"endpoint_url": server.endpoint, "region_name": "us-east-1"}})


@dataclass(frozen=True)
class Prefix:
    """This module's corner of the test S3 server, as the tests (not Airflow) see it."""

    server: SeaweedFS
    name: str

    def uri(self, key: str) -> str:
        return f"s3://{self.server.bucket}/{self.name}/{key}"

    def _client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.server.endpoint, region_name="us-east-1",
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def put(self, key: str, path: Path) -> str:
        self._client().upload_file(str(path), self.server.bucket, f"{self.name}/{key}")
        return self.uri(key)

    def text(self, key: str) -> str:
        body = self._client().get_object(Bucket=self.server.bucket, Key=f"{self.name}/{key}")
        return str(body["Body"].read().decode("utf-8"))


@pytest.fixture(scope="module")
def s3(seaweedfs: SeaweedFS) -> Prefix:
    return Prefix(seaweedfs, f"airflow-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def dag_env(tmp_path_factory: pytest.TempPathFactory, s3: Prefix, tiny_model: Path,
            pg_url: str, image_server: ImageServer) -> dict[str, str]:
    """Store and results through Airflow connections only: no AWS_* credentials or endpoint in
    the environment, and SIM_PIPELINE_DATABASE_URL a decoy that must stay unused."""
    home = tmp_path_factory.mktemp("airflow-home")
    env = airflow_env(home, {
        "AIRFLOW__CORE__MAX_MAP_LENGTH": str(MAX_MAP_LENGTH),
        "AIRFLOW_CONN_SIM_PIPELINE_RESULTS": postgres_connection(pg_url),
        "AIRFLOW_CONN_SIM_PIPELINE_STORE": aws_connection(s3.server),
        "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        "SIM_PIPELINE_DATABASE_URL": f"sqlite:///{home / 'decoy.db'}",
        "SIM_PIPELINE_STORE": s3.uri("store"), "SIM_PIPELINE_MODEL": str(tiny_model),
        "SIM_PIPELINE_CHUNK_SIZE": "1", "SIM_PIPELINE_DEVICE": "cpu",
        "SIM_PIPELINE_BATCH_SIZE": "8", "SIM_PIPELINE_FETCH_TIMEOUT": "3",
        "SIM_PIPELINE_ALLOW_HOSTS": image_server.allow_hosts,
        "SIM_PIPELINE_PROGRESS_SECONDS": "0.05",  # so even a tiny model's stage logs progress
    })
    run_airflow(["db", "migrate"], env)
    return env


@pytest.fixture(scope="module")
def runs(dag_env: dict[str, str], s3: Prefix, image_server: ImageServer,
         tmp_path_factory: pytest.TempPathFactory) -> Runs:
    local = tmp_path_factory.mktemp("inputs")
    urls = serve_good_images(image_server, ROWS - 1, prefix="dagtest")
    urls.append(image_server.add("/dagtest/gone.jpg", Route(404, b"gone", "text/plain")))
    pairs = s3.put("input/pairs.csv", write_pairs(local / "pairs.csv", urls))
    nightly = serve_good_images(image_server, NIGHTLY_ROWS, prefix="nightly")
    s3.put("store/incoming/2025-02-01.csv",
           write_pairs(local / "2025-02-01.csv", nightly, prefix="nightly photo"))
    empty = s3.put("input/empty.csv", write_pairs(local / "empty.csv", []))
    (local / "no-caption.csv").write_text(f"url,description\n{urls[0]},a photo\n")
    no_caption = s3.put("input/no-caption.csv", local / "no-caption.csv")
    conf = {"csv_path": pairs}
    answer, output = helper_with_output("dag-test", [
        {"logical_date": "2025-01-01T00:00:00+00:00", "conf": conf},
        {"logical_date": "2025-01-02T00:00:00+00:00", "conf": conf},
        {"logical_date": "2025-02-01T02:00:00+00:00"},  # nightly: no csv_path
        {"logical_date": "2025-02-02T02:00:00+00:00"},
        {"logical_date": "2025-03-01T00:00:00+00:00", "conf": {"csv_path": empty}},
        {"logical_date": "2025-03-02T00:00:00+00:00",
         "conf": {"csv_path": s3.uri("input/no-such-file.csv")}},
        {"logical_date": "2025-03-03T00:00:00+00:00", "conf": {"csv_path": no_caption}},
        {"logical_date": "2025-03-04T00:00:00+00:00",
         "conf": {"csv_path": pairs, "model": str(local / "no-such-model")}},
        {"logical_date": "2025-03-05T00:00:00+00:00",  # fails in finalize, after every chunk
         "conf": {"csv_path": pairs, "output_path": "/dev/null/scored.csv"}},
    ], dag_env, timeout=300)
    return Runs(answer["bag"], answer["runs"], output)


def safe(run_id: str) -> str:
    """The run id as the scored CSV's name carries it."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", run_id).strip("-")


def states(run: dict[str, Any]) -> dict[str, list[str]]:
    by_task: dict[str, list[str]] = {}
    for task_id, _, state, *_ in run["tasks"]:
        by_task.setdefault(task_id, []).append(state)
    return by_task


def all_succeeded(chunks: int) -> dict[str, list[str]]:
    return {"plan_chunks": ["success"], "finalize": ["success"],
            **{task: ["success"] * chunks for task in MAPPED}}


def test_every_mapped_task_succeeds_once_per_chunk(runs: Runs) -> None:
    first = runs.runs[FIRST]
    assert first["state"] == "success"
    assert states(first) == all_succeeded(chunks=3)


def test_results_table_holds_one_row_per_input_row_under_the_airflow_run_id(
        runs: Runs, pg_url: str, s3: Prefix, dag_env: dict[str, str]) -> None:
    run_id = runs.runs[FIRST]["run_id"]
    assert ":" in run_id and "+" in run_id  # Airflow's run ids work as store keys and DB keys
    rows = score_rows(pg_url, run_id)
    assert [r["row_number"] for r in rows] == list(range(ROWS))
    assert [r["error"] for r in rows] == [None] * (ROWS - 1) + ["http_404"]
    assert run_status(pg_url, run_id)["status"] == "succeeded"
    named = f"input/pairs_{safe(run_id)}_scored"  # beside the s3:// input, named by the run
    assert s3.text(f"{named}.csv").count("\n") == ROWS + 1
    assert "<svg" in s3.text(f"{named}_report.html")  # the run's report beside it
    assert json.loads(s3.text(f"store/runs/{run_id}/current.json"))  # the run id as a key
    assert not Path(dag_env["AIRFLOW_HOME"], "decoy.db").exists()  # the connection won


def test_a_second_run_of_the_same_conf_adds_its_own_rows_and_leaves_the_first_alone(
        runs: Runs, pg_url: str, s3: Prefix) -> None:
    first, second = runs.runs[FIRST]["run_id"], runs.runs[SECOND]["run_id"]
    assert runs.runs[SECOND]["state"] == "success" and second != first
    assert len(score_rows(pg_url, second)) == ROWS
    assert s3.text(f"input/pairs_{safe(second)}_scored.csv") == \
        s3.text(f"input/pairs_{safe(first)}_scored.csv")  # its own file: nothing overwritten
    first_rows = score_rows(pg_url, first)
    assert len(first_rows) == ROWS
    second_started: datetime = run_status(pg_url, second)["started_at"]
    assert max(r["scored_at"] for r in first_rows) < second_started  # not rewritten by it


def test_a_nightly_run_scores_the_file_of_its_logical_date_in_few_enough_chunks(
        runs: Runs, pg_url: str, s3: Prefix) -> None:
    nightly = runs.runs[NIGHTLY]
    assert nightly["state"] == "success"
    assert states(nightly) == all_succeeded(chunks=MAX_MAP_LENGTH)
    assert run_status(pg_url, nightly["run_id"])["source"].endswith("/2025-02-01.csv")
    assert len(score_rows(pg_url, nightly["run_id"])) == NIGHTLY_ROWS
    scored = f"store/incoming/2025-02-01_{safe(nightly['run_id'])}_scored.csv"
    assert s3.text(scored).count("\n") == NIGHTLY_ROWS + 1
    assert "chunk size grown from 1 to 2" in runs.output


def test_a_nightly_run_whose_file_is_missing_skips_and_writes_nothing(
        runs: Runs, pg_url: str) -> None:
    missing = runs.runs[MISSING]
    assert missing["state"] == "success"
    assert set(states(missing)) == {"plan_chunks", "finalize", *MAPPED}
    assert all(s == ["skipped"] for s in states(missing).values())
    assert "INFO - No nightly input for 2025-02-02" in runs.output.replace("[info     ]", "INFO -")
    assert run_status(pg_url, missing["run_id"]) is None
    assert score_rows(pg_url, missing["run_id"]) == []


@pytest.fixture(scope="module")
def bag(runs: Runs) -> dict[str, Any]:
    """The dags folder parsed by a DagBag in a fresh process, as the dag processor parses it."""
    return runs.bag


def test_an_input_with_a_header_and_no_rows_skips(runs: Runs, pg_url: str) -> None:
    empty = runs.runs[EMPTY]
    assert empty["state"] == "success"
    assert all(s == ["skipped"] for s in states(empty).values())
    assert "has a header but no rows: nothing to score" in runs.output
    assert run_status(pg_url, empty["run_id"]) is None


def test_a_csv_path_that_does_not_exist_fails_at_once_without_retries(runs: Runs,
                                                                     pg_url: str) -> None:
    wrong = runs.runs[WRONG_PATH]
    assert wrong["state"] == "failed"
    plan = [t[:4] for t in wrong["tasks"] if t[0] == "plan_chunks"]
    assert plan == [["plan_chunks", -1, "failed", 1]]  # a retry could not make the file appear
    assert "no-such-file.csv does not exist; check the trigger form's 'csv_path' field." \
        in runs.output
    assert_recorded_failed(pg_url, wrong["run_id"],
                           "no-such-file.csv does not exist; check the trigger form's 'csv_path' "
                           "field.")


def assert_recorded_failed(pg_url: str, run_id: str, failure: str) -> None:
    """A run that failed before or while planning still has its scoring_runs row, failed, with
    the sentence its task failed with."""
    status = run_status(pg_url, run_id)
    assert status is not None and status["status"] == "failed", status
    assert status["finished_at"] is not None
    assert failure in (status["failure"] or ""), status


def test_the_dag_file_parses_fast_without_torch(bag: dict[str, Any]) -> None:
    assert bag["import_errors"] == {} and bag["dags"] == ["score_drift", "similarity_scoring"]
    assert bag["seconds"] < 2.0
    assert bag["heavy_modules"] == []  # torch, transformers, the stages load in tasks


def test_each_chunk_flows_through_its_own_task_group(bag: dict[str, Any]) -> None:
    """Depth-first: a chunk's embedding waits for its own fetch only, its texts for nothing but
    the plan, its join for its own embeddings; finalize waits for every chunk."""
    upstream = {task: info["upstream"] for task, info in bag["tasks"].items()}
    assert upstream == {
        "plan_chunks": [],
        "score_chunk.fetch_images": ["plan_chunks"],
        "score_chunk.embed_images": ["plan_chunks", "score_chunk.fetch_images"],
        "score_chunk.embed_texts": ["plan_chunks"],
        "score_chunk.join_score": ["plan_chunks", "score_chunk.embed_images",
                                   "score_chunk.embed_texts"],
        "finalize": ["score_chunk.join_score"]}
    assert {t for t, info in bag["tasks"].items() if info["mapped"]} == set(MAPPED)
    tasks = bag["tasks"]
    assert tasks["score_chunk.embed_images"]["pool"] == "gpu"
    assert tasks["score_chunk.embed_texts"]["pool"] == "gpu"
    assert tasks["score_chunk.fetch_images"]["pool"] == "image_fetch"
    assert tasks["score_chunk.fetch_images"]["retries"] > \
        tasks["score_chunk.join_score"]["retries"] > 0
    assert (bag["schedule"], bag["catchup"]) == ("0 2 * * *", False)
    assert set(bag["params"]) == {"csv_path", "output_path", "chunk_size", "model"}
    assert all(bag["params"].values())  # every field of the trigger form says what it is for


def test_mapped_tasks_are_labelled_by_chunk_and_rows(runs: Runs) -> None:
    labels = {(t[0], t[1]): t[4] for t in runs.runs[FIRST]["tasks"]}
    for task in MAPPED:
        assert [labels[(task, i)] for i in range(3)] == \
            ["chunk 0: rows 0-3", "chunk 1: rows 4-7", "chunk 2: rows 8-9"]


def test_each_stage_logs_progress_and_ends_with_one_human_line(runs: Runs) -> None:
    assert re.search(r"embed-images, chunk \d: rows \d-\d: still running after \d+ s\.",
                     runs.output)  # every 0.05 s here; every 30 s by default
    assert re.search(r"fetch-images, chunk 2: rows 8-9: 2 rows in [\d.]+ s \(\d+ rows/s\); "
                     r"attempted 2, ok 1.*errors http_404 1", runs.output)
    assert re.search(r"join-score, chunk 0: rows 0-3: 4 rows in [\d.]+ s \(\d+ rows/s\); "
                     r"rows 4, ok 4\.", runs.output)


def test_a_chunk_size_outside_the_forms_bounds_is_refused_at_trigger(
        dag_env: dict[str, str]) -> None:
    zero, one, floor, huge = helper("params", [{"chunk_size": 0}, {"chunk_size": 1},
                                               {"chunk_size": 100}, {"chunk_size": 10**7}],
                                    dag_env)
    assert floor is None
    assert "chunk_size" in zero and "100" in zero  # refused, never turned into 1
    assert "chunk_size" in one and "chunk_size" in huge


def test_an_input_without_a_caption_column_fails_at_once_naming_the_field(
        runs: Runs, pg_url: str) -> None:
    run = runs.runs[NO_CAPTION]
    assert run["state"] == "failed"
    assert [t[:4] for t in run["tasks"] if t[0] == "plan_chunks"] == \
        [["plan_chunks", -1, "failed", 1]]
    assert re.search(r"No caption column found \(looked for [^)]*the file has 'url', "
                     r"'description'\); check the trigger form's 'csv_path' field\.", runs.output)
    assert_recorded_failed(pg_url, run["run_id"], "check the trigger form's 'csv_path' field.")


def test_a_model_that_cannot_load_fails_at_once_and_marks_the_run_failed(
        runs: Runs, pg_url: str) -> None:
    run = runs.runs[NO_MODEL]
    assert run["state"] == "failed"
    assert [t[:4] for t in run["tasks"] if t[2] == "failed"] == \
        [["plan_chunks", -1, "failed", 1]]  # one try: no retry can load it
    reasons = re.findall(r"AirflowFailException: (.*no-such-model.*)", runs.output)
    assert reasons and all(r.endswith("no such folder; check the trigger form's 'model' field.")
                           and "--model" not in r for r in reasons)  # the form's field
    assert_recorded_failed(pg_url, run["run_id"], reasons[0])


def test_a_run_that_fails_after_planning_is_marked_failed(runs: Runs, pg_url: str) -> None:
    """The DAG's on_failure_callback closes the scoring run: it never stays 'running'."""
    run = runs.runs[NO_OUTPUT]
    assert run["state"] == "failed"
    assert states(run)["finalize"] == ["failed"]
    assert [t[3] for t in run["tasks"] if t[0] == "finalize"] == [1]  # not retried
    assert "/dev/null is not a writable folder; check the trigger form's 'output_path' field." \
        in runs.output
    status = run_status(pg_url, run["run_id"])
    assert status is not None and status["failure"].startswith("finalize: Cannot write the "), \
        status
    assert status["failure"].endswith("/dev/null is not a writable folder; check the trigger "
                                      "form's 'output_path' field."), status
    assert status["status"] == "failed" and status["finished_at"] is not None
    assert len(score_rows(pg_url, run["run_id"])) == ROWS  # the chunks' rows stay, findable
