"""The similarity_scoring DAG under real Airflow 3: dag.test() runs, configured as in production.

The metadata database is SQLite in a temporary AIRFLOW_HOME; the object store is S3 (SeaweedFS on
loopback) and the results database PostgreSQL, both reached only through Airflow connections. One
process runs four dag.test() runs in turn (torch loads once): a manual run of an s3:// input over
three chunks, a second run of the same conf, the nightly run of a day whose input exists and one
of a day whose input is missing. max_map_length is 3, so the nightly run must grow its chunks.
"""

from __future__ import annotations

import json
import os
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

ROWS, CHUNK_SIZE = 10, 4  # three chunks: 4 + 4 + 2
NIGHTLY_ROWS = 5  # planned with SIM_PIPELINE_CHUNK_SIZE=1, that would be 5 chunks: over the limit
MAX_MAP_LENGTH = 3
FIRST, SECOND, NIGHTLY, MISSING, EMPTY, WRONG_PATH = range(6)


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
    conf = {"csv_path": pairs, "chunk_size": CHUNK_SIZE}
    answer, output = helper_with_output("dag-test", [
        {"logical_date": "2025-01-01T00:00:00+00:00", "conf": conf},
        {"logical_date": "2025-01-02T00:00:00+00:00", "conf": conf},
        {"logical_date": "2025-02-01T02:00:00+00:00"},  # nightly: no csv_path
        {"logical_date": "2025-02-02T02:00:00+00:00"},
        {"logical_date": "2025-03-01T00:00:00+00:00", "conf": {"csv_path": empty}},
        {"logical_date": "2025-03-02T00:00:00+00:00",
         "conf": {"csv_path": s3.uri("input/no-such-file.csv")}},
    ], dag_env, timeout=240)
    return Runs(answer["bag"], answer["runs"], output)


def states(run: dict[str, Any]) -> dict[str, list[str]]:
    by_task: dict[str, list[str]] = {}
    for task_id, _, state, _ in run["tasks"]:
        by_task.setdefault(task_id, []).append(state)
    return by_task


def all_succeeded(chunks: int) -> dict[str, list[str]]:
    mapped = ("fetch_images", "embed_images", "embed_texts", "join_score")
    return {"plan_chunks": ["success"], "finalize": ["success"],
            **{task: ["success"] * chunks for task in mapped}}


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
    assert s3.text("input/pairs_scored.csv").count("\n") == ROWS + 1  # beside the s3:// input
    assert "<svg" in s3.text("input/pairs_scored_report.html")  # the run's report beside it
    assert json.loads(s3.text(f"store/runs/{run_id}/current.json"))  # the run id as a key
    assert not Path(dag_env["AIRFLOW_HOME"], "decoy.db").exists()  # the connection won


def test_a_second_run_of_the_same_conf_adds_its_own_rows_and_leaves_the_first_alone(
        runs: Runs, pg_url: str) -> None:
    first, second = runs.runs[FIRST]["run_id"], runs.runs[SECOND]["run_id"]
    assert runs.runs[SECOND]["state"] == "success" and second != first
    assert len(score_rows(pg_url, second)) == ROWS
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
    assert s3.text("store/incoming/2025-02-01_scored.csv").count("\n") == NIGHTLY_ROWS + 1
    assert "chunk size grown from 1 to 2" in runs.output


def test_a_nightly_run_whose_file_is_missing_skips_and_writes_nothing(
        runs: Runs, pg_url: str) -> None:
    missing = runs.runs[MISSING]
    assert missing["state"] == "success"
    assert set(states(missing)) == {"plan_chunks", "finalize", "fetch_images", "embed_images",
                                    "embed_texts", "join_score"}
    assert all(s == ["skipped"] for s in states(missing).values())
    assert "No nightly input for 2025-02-02" in runs.output
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


def test_a_csv_path_that_does_not_exist_fails_at_once_without_retries(runs: Runs) -> None:
    wrong = runs.runs[WRONG_PATH]
    assert wrong["state"] == "failed"
    plan = [t for t in wrong["tasks"] if t[0] == "plan_chunks"]
    assert plan == [["plan_chunks", -1, "failed", 1]]  # a retry could not make the file appear
    assert "no-such-file.csv does not exist" in runs.output


def test_the_dag_file_parses_fast_without_torch(bag: dict[str, Any]) -> None:
    assert bag["import_errors"] == {} and bag["dags"] == ["similarity_scoring"]
    assert bag["seconds"] < 2.0
    assert bag["heavy_modules"] == []  # torch, transformers, even sim_pipeline load in tasks


def test_the_dag_reads_like_the_pipeline_diagram(bag: dict[str, Any]) -> None:
    upstream = {task: info["upstream"] for task, info in bag["tasks"].items()}
    assert upstream == {
        "plan_chunks": [], "fetch_images": ["plan_chunks"],
        "embed_images": ["fetch_images", "plan_chunks"],
        "embed_texts": ["fetch_images", "plan_chunks"],
        "join_score": ["embed_images", "embed_texts", "plan_chunks"],
        "finalize": ["join_score"]}
    assert {t for t, info in bag["tasks"].items() if info["mapped"]} == \
        {"fetch_images", "embed_images", "embed_texts", "join_score"}
    assert bag["tasks"]["embed_images"]["pool"] == bag["tasks"]["embed_texts"]["pool"] == "gpu"
    assert bag["tasks"]["fetch_images"]["pool"] == "image_fetch"
    assert bag["tasks"]["fetch_images"]["retries"] > bag["tasks"]["join_score"]["retries"] > 0
    assert (bag["schedule"], bag["catchup"]) == ("0 2 * * *", False)
    assert set(bag["params"]) == {"csv_path", "output_path", "chunk_size", "model"}
    assert all(bag["params"].values())  # every field of the trigger form says what it is for
