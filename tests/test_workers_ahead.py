"""The CLI starts its fetch worker processes while the model check runs, never sends a request
before the check is done, and scores exactly as a run that fetches in its own process; the
``sim-pipeline`` program exits without tearing the interpreter down, yet runs every exit
handler, flushes its output and keeps its status."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sim_pipeline.core.config import Settings
from sim_pipeline.runners.lifecycle import Run
from sim_pipeline.runners.pipeline import score_csv
from sim_pipeline.stages.fetch import workers
from tests.conftest import ImageServer
from tests.pairs import Case, read_csv, serve_good_images, write_cases
from tests.test_score_cli import score

ROWS = 300  # enough for two workers started ahead (MIN_URLS_PER_STARTED_PROCESS each)


@pytest.fixture
def slow_check(monkeypatch: pytest.MonkeyPatch, image_server: ImageServer
               ) -> Iterator[dict[str, int]]:
    """The model check takes a second, as on a cold machine (importing torch and
    transformers); what it saw when it ended: workers started, requests the server had."""
    seen: dict[str, int] = {}
    check = Run.check_model

    def slow(run: Run, run_id: str) -> None:
        time.sleep(1.0)
        try:
            check(run, run_id)
        finally:
            seen.update(workers=workers.started(), requests=image_server.total_requests())

    monkeypatch.setattr(Run, "check_model", slow)
    yield seen


def many_pairs(image_server: ImageServer, path: Path, prefix: str) -> Path:
    urls = serve_good_images(image_server, ROWS, prefix=prefix)
    return write_cases(path, [Case(url, f"caption {i}", None) for i, url in enumerate(urls)])


def test_workers_start_during_the_check_and_fetch_after_it(
        tmp_path: Path, settings: Settings, image_server: ImageServer,
        slow_check: dict[str, int]) -> None:
    source = many_pairs(image_server, tmp_path / "pairs.csv", "ahead")
    fast = settings.replace(fetch_processes=2)
    before = image_server.total_requests()
    assert score(source, fast, "--run-id", "ahead", "--fetch-processes", "2") == 0
    assert slow_check == {"workers": 2, "requests": before}, "started, and nothing fetched"
    assert image_server.total_requests() - before == ROWS  # each image once, by the workers
    ahead = read_csv(tmp_path / "pairs_scored.csv")

    workers.stop_all()
    in_process = score_csv(source, fast.replace(store=str(tmp_path / "other-store")),
                           tmp_path / "in-process.csv", progress=False, run_id="in-process")
    assert in_process.ok == ROWS
    assert ahead == read_csv(tmp_path / "in-process.csv")
    assert workers.started() == 0, "score_csv starts no worker ahead unless asked"


def test_a_refused_model_sends_no_request_though_workers_started(
        tmp_path: Path, settings: Settings, image_server: ImageServer,
        slow_check: dict[str, int], capsys: pytest.CaptureFixture[str]) -> None:
    source = many_pairs(image_server, tmp_path / "pairs.csv", "ahead-refused")
    before = image_server.total_requests()
    missing = settings.replace(model=str(tmp_path / "no-such-model"))
    assert score(source, missing, "--fetch-processes", "2") == 2
    assert "no-such-model" in capsys.readouterr().err
    assert slow_check["workers"] == 2
    assert image_server.total_requests() == before


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)


def test_exit_runs_handlers_flushes_output_and_keeps_the_status() -> None:
    done = run_python(
        "import atexit, sys; from sim_pipeline.cli import exit_without_teardown; "
        "atexit.register(print, 'handler ran'); sys.stdout.write('buffered '); "
        "sys.stderr.write('on stderr'); exit_without_teardown(3)")
    assert (done.returncode, done.stdout, done.stderr) == (3, "buffered handler ran\n",
                                                         "on stderr")


def test_exit_waits_for_a_thread_that_still_runs(tmp_path: Path) -> None:
    marker = tmp_path / "written"
    done = run_python(
        "import threading, time; from pathlib import Path; "
        "from sim_pipeline.cli import exit_without_teardown; "
        f"write = lambda: (time.sleep(0.5), Path({str(marker)!r}).write_text('done')); "
        "threading.Thread(target=write).start(); exit_without_teardown(0)")
    assert done.returncode == 0 and marker.read_text() == "done"


def test_the_program_exits_with_the_commands_status(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "sim_pipeline.cli", "score",
                           str(tmp_path / "absent.csv")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("sim-pipeline: error:") and "absent.csv" in done.stderr
