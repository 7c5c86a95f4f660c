"""A run refused before or while planning still has its ``scoring_runs`` row, failed, with the
sentence the user read; real PostgreSQL, the ``sim-pipeline`` command run in-process.

A run has an id once ``--run-id`` (or ``SIM_PIPELINE_RUN_ID``) names it, or once its input could
be read (the id is derived from the content): from then on every refusal is recorded. A missing
input without ``--run-id`` has no id, so it is only refused, in one line. A model given as a local
folder that is not there is refused at once with "no such folder", never asked of the model hub.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from sim_pipeline import cli, score_pairs
from sim_pipeline.core.config import Settings
from sim_pipeline.core.errors import UserError
from tests.airflow_helpers import run_status, runs_of_source
from tests.conftest import ImageServer
from tests.pairs import Case, serve_good_images, write_cases

NO_SUCH_FOLDER = ("no such folder; set SIM_PIPELINE_MODEL (or --model) to a Hugging Face hub id "
                  "or a folder saved with save_pretrained.")


@pytest.fixture
def source(tmp_path: Path, image_server: ImageServer) -> Path:
    (url,) = serve_good_images(image_server, 1, prefix="records")
    return write_cases(tmp_path / "pairs.csv", [Case(url, "a caption", None)])


def score(source: Path, settings: Settings, pg_url: str, *extra: str) -> int:
    return cli.main(["score", str(source), "--quiet", "--model", settings.model,
                     "--store", settings.store, "--database-url", pg_url, "--device", "cpu",
                     "--allow-hosts", settings.allow_hosts, *extra])


def refusal(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line the command ended with on stderr."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err.removeprefix("sim-pipeline: error: ")


def assert_failed_with(pg_url: str, run_id: str, sentence: str) -> None:
    status = run_status(pg_url, run_id)
    assert status is not None, f"no scoring_runs row for {run_id}"
    assert (status["status"], status["failure"]) == ("failed", sentence), status
    assert status["finished_at"] is not None


def new_run_id() -> str:
    return f"refused-{uuid.uuid4().hex[:8]}"


def test_a_missing_input_named_by_run_id_is_recorded_failed(
        tmp_path: Path, settings: Settings, pg_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    run_id = new_run_id()
    assert score(tmp_path / "no-such.csv", settings, pg_url, "--run-id", run_id) == 2
    sentence = refusal(capsys)
    assert sentence == f"Input file {tmp_path / 'no-such.csv'} does not exist."
    assert_failed_with(pg_url, run_id, sentence)


def test_a_missing_input_without_a_run_id_is_refused_without_a_row(
        tmp_path: Path, settings: Settings, pg_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such.csv"
    assert score(missing, settings, pg_url) == 2
    assert refusal(capsys) == f"Input file {missing} does not exist."
    assert runs_of_source(pg_url, str(missing)) == []  # no content, so no run id to record


def test_a_model_folder_that_does_not_exist_is_refused_at_once_and_recorded(
        source: Path, settings: Settings, pg_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """No --run-id: the id derived from the input's content carries the failure."""
    missing = settings.replace(model=str(source.parent / "no-such-model"))
    started = time.monotonic()
    assert score(source, missing, pg_url) == 2
    seconds = time.monotonic() - started
    sentence = refusal(capsys)
    assert sentence == f"Model {missing.model}: {NO_SUCH_FOLDER}"
    (run_id,) = runs_of_source(pg_url, str(source))
    assert_failed_with(pg_url, run_id, sentence)
    print(f"missing model folder refused in {seconds:.2f} s")


def test_a_relative_model_path_is_a_folder_not_a_hub_id(
        source: Path, settings: Settings, pg_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    run_id = new_run_id()
    relative = settings.replace(model="./no-such-model")
    assert score(source, relative, pg_url, "--run-id", run_id) == 2
    sentence = refusal(capsys)
    assert sentence == f"Model ./no-such-model: {NO_SUCH_FOLDER}"
    assert_failed_with(pg_url, run_id, sentence)


@pytest.mark.parametrize(("flags", "sentence"), [
    (["--chunk-size", "0"], "--chunk-size 0 must be a positive integer."),
    (["--caption-column", "nope"], "No caption column found (looked for nope; the file has "
     "'id', 'Image_URL', 'Caption', 'notes'); check the column name."),
])
def test_a_refused_option_of_a_named_run_is_recorded_failed(
        source: Path, settings: Settings, pg_url: str, capsys: pytest.CaptureFixture[str],
        flags: list[str], sentence: str) -> None:
    run_id = new_run_id()
    assert score(source, settings, pg_url, "--run-id", run_id, *flags) == 2
    assert refusal(capsys) == sentence
    assert_failed_with(pg_url, run_id, sentence)


def test_a_run_refused_after_an_earlier_success_is_failed_with_the_new_sentence(
        source: Path, settings: Settings, pg_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    run_id = new_run_id()
    assert score(source, settings, pg_url, "--run-id", run_id) == 0
    assert run_status(pg_url, run_id)["status"] == "succeeded"
    capsys.readouterr()
    source.unlink()
    assert score(source, settings, pg_url, "--run-id", run_id) == 2
    assert_failed_with(pg_url, run_id, refusal(capsys))


def test_score_pairs_refuses_a_missing_model_folder_before_any_download(
        tmp_path: Path, settings: Settings, image_server: ImageServer) -> None:
    """The API records no run (it writes no results table rows); it refuses in one sentence."""
    (url,) = serve_good_images(image_server, 1, prefix="api-records")
    before = image_server.total_requests()
    missing = settings.replace(model=str(tmp_path / "no-such-model"))
    with pytest.raises(UserError) as refused:
        list(score_pairs([(url, "a caption")], missing))
    assert str(refused.value) == f"Model {missing.model}: {NO_SUCH_FOLDER}"
    assert image_server.total_requests() == before
