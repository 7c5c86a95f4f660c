"""A fault ends a run with one sentence and a clean state, and a rerun resumes.

Real faults only: a PostgreSQL connection cut mid-run (through a loopback proxy, the server itself
untouched), a full disk (a small tmpfs, which needs root; elsewhere these tests are skipped with
that reason), and a CLI killed with SIGTERM or SIGKILL while its fetch worker processes download.
"""

from __future__ import annotations

import io
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from sim_pipeline.core.config import Settings
from sim_pipeline.core.layout import EMBED_IMAGES, EMBED_TEXTS, FETCH_IMAGES
from sim_pipeline.stages.registry import CHUNK_STAGES, Stage
from tests.conftest import ImageServer, Route, make_image
from tests.pairs import Case, read_csv, serve_good_images, write_cases
from tests.seaweed import SeaweedFS
from tests.support.tcp_proxy import PortProxy
from tests.test_score_cli import score

pytest_plugins = ["tests.plugin_s3"]


def run_status(url: str, run_id: str) -> str:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        status = conn.execute(sa.text("SELECT status FROM scoring_runs WHERE run_id = :r"),
                              {"r": run_id}).scalar_one()
    engine.dispose()
    return status


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("sim-pipeline:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_database_that_goes_away_mid_run_ends_in_one_sentence_and_the_run_is_marked_failed(
        tmp_path: Path, settings: Settings, image_server: ImageServer, pg_url: str,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pg_port = sa.make_url(pg_url).port
    proxy = PortProxy(pg_port)
    proxy.start()
    through_proxy = pg_url.replace(f"127.0.0.1:{pg_port}", f"127.0.0.1:{proxy.port}")
    run = settings.replace(database_url=through_proxy)
    urls = serve_good_images(image_server, 4, prefix="db-away")
    first = write_cases(tmp_path / "first.csv", [Case(u, "a caption", None) for u in urls])
    real = CHUNK_STAGES[EMBED_TEXTS].run

    def database_goes_away(chunk, store, settings, results):  # noqa: ANN001, ANN202
        proxy.stop()
        return real(chunk, store, settings, results)

    monkeypatch.setitem(CHUNK_STAGES, EMBED_TEXTS, Stage(EMBED_TEXTS, database_goes_away))
    assert score(first, run, "--run-id", "db-away", "--db-retry-seconds", "2") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "stopped answering" in line and "rerun the same command" in line
    assert "postgresql" in line and not (tmp_path / "first_scored.csv").exists()

    monkeypatch.setitem(CHUNK_STAGES, EMBED_TEXTS, Stage(EMBED_TEXTS, real))
    proxy.start()
    assert run_status(pg_url, "db-away") == "running"  # nobody could tell the database yet
    second = write_cases(tmp_path / "second.csv", [Case(urls[0], "another", None)])
    assert score(second, run) == 0  # the next run that reaches the database tells it
    assert run_status(pg_url, "db-away") == "failed"

    assert score(first, run, "--run-id", "db-away") == 0  # and a rerun resumes
    assert run_status(pg_url, "db-away") == "succeeded"
    assert len(read_csv(tmp_path / "first_scored.csv")) == 5
    proxy.stop()


def test_a_database_outage_during_fetch_costs_no_timing_and_asks_for_no_rerun(
        tmp_path: Path, settings: Settings, image_server: ImageServer, pg_url: str,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """The database is away when the fetch stage's time is recorded and back before the run
    ends: the run succeeds with every row, keeps that time and records it later, and tells the
    user nothing about rerunning."""
    pg_port = sa.make_url(pg_url).port
    proxy = PortProxy(pg_port)
    proxy.start()
    run = settings.replace(database_url=pg_url.replace(f"127.0.0.1:{pg_port}",
                                                       f"127.0.0.1:{proxy.port}"))
    urls = serve_good_images(image_server, 3, prefix="db-blip")
    source = write_cases(tmp_path / "pairs.csv", [Case(u, "a caption", None) for u in urls])
    fetch, embed = CHUNK_STAGES[FETCH_IMAGES], CHUNK_STAGES[EMBED_IMAGES]

    def database_goes_away(chunk, store, settings, results):  # noqa: ANN001, ANN202
        proxy.stop()
        return fetch.run(chunk, store, settings, results)

    def database_comes_back(chunk, store, settings, results):  # noqa: ANN001, ANN202
        proxy.start()
        return embed.run(chunk, store, settings, results)

    monkeypatch.setitem(CHUNK_STAGES, FETCH_IMAGES, replace(fetch, run=database_goes_away))
    monkeypatch.setitem(CHUNK_STAGES, EMBED_IMAGES, replace(embed, run=database_comes_back))
    with caplog.at_level(logging.WARNING):
        assert score(source, run, "--run-id", "db-blip", "--db-retry-seconds", "1") == 0
    said = capsys.readouterr().err + caplog.text
    assert "rerun" not in said and "Could not record" not in said
    assert len(read_csv(tmp_path / "pairs_scored.csv")) == 4  # the header and every row
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        stages = set(conn.execute(sa.text("SELECT stage FROM stage_timings WHERE run_id = "
                                          "'db-blip'")).scalars())
    engine.dispose()
    assert FETCH_IMAGES in stages, "the time taken during the outage was recorded later"
    proxy.stop()


def test_an_object_store_that_goes_away_mid_run_ends_in_one_sentence(
        tmp_path: Path, settings: Settings, image_server: ImageServer, s3_env: SeaweedFS,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    s3_port = int(s3_env.endpoint.rsplit(":", 1)[1])
    proxy = PortProxy(s3_port)
    proxy.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    urls = serve_good_images(image_server, 3, prefix="s3-away")
    source = write_cases(tmp_path / "pairs.csv", [Case(u, "a caption", None) for u in urls])
    run = settings.replace(store=f"s3://{s3_env.bucket}/away-{tmp_path.name}")
    real = CHUNK_STAGES[EMBED_TEXTS].run

    def store_goes_away(chunk, store, settings, results):  # noqa: ANN001, ANN202
        proxy.stop()
        return real(chunk, store, settings, results)

    monkeypatch.setitem(CHUNK_STAGES, EMBED_TEXTS, Stage(EMBED_TEXTS, store_goes_away))
    assert score(source, run) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "Cannot reach the S3 endpoint" in line
    assert not (tmp_path / "pairs_scored.csv").exists()
    monkeypatch.setitem(CHUNK_STAGES, EMBED_TEXTS, Stage(EMBED_TEXTS, real))
    proxy.start()
    assert score(source, run) == 0  # the same command resumes once the store is back
    proxy.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[callable]:
    """Mount a tmpfs of a given size (root only); unmounted at the end."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(folder)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"a full disk is simulated with a small tmpfs, which needs root here "
                        f"({done.stderr.strip() or 'mount failed'})", pytrace=False)
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def big_images(server: ImageServer, count: int, prefix: str) -> list[str]:
    """Noise PNGs of ~96 KB each (noise does not compress): a few of them fill a small disk."""
    urls = []
    for i in range(count):
        pixels = np.random.default_rng(500 + i).integers(0, 256, (160, 200, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        urls.append(server.add(f"/{prefix}/{i}.png", Route(body=buffer.getvalue(),
                                                            content_type="image/png")))
    return urls


def test_a_full_disk_under_the_store_ends_in_one_sentence_with_nothing_half_written(
        tmp_path: Path, settings: Settings, image_server: ImageServer, small_disk: callable,
        capsys: pytest.CaptureFixture[str]) -> None:
    store = small_disk("store", "256k")
    urls = big_images(image_server, 12, "full-store")
    source = write_cases(tmp_path / "pairs.csv", [Case(u, "a caption", None) for u in urls])
    assert score(source, settings.replace(store=str(store))) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "No space left on the device" in line and "rerun the same command" in line
    assert leftovers(store) == [] and not (tmp_path / "pairs_scored.csv").exists()


def long_rows(tmp_path: Path, server: ImageServer, prefix: str, count: int, caption: str
              ) -> Path:
    """``count`` rows over 3 images, each with a long (distinct) caption."""
    urls = serve_good_images(server, 3, prefix=prefix)
    return write_cases(tmp_path / "pairs.csv", [Case(urls[i % 3], f"{i} {caption}", None)
                                                for i in range(count)])


def test_a_full_disk_under_the_output_leaves_no_partial_csv(
        tmp_path: Path, settings: Settings, image_server: ImageServer, small_disk: callable,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = small_disk("out", "8k")
    source = long_rows(tmp_path, image_server, "full-out", 30, "a caption that takes room " * 40)
    assert score(source, settings, "-o", str(out / "scored.csv")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "No space left on the device" in line
    assert list(out.iterdir()) == []
    # The run's row is failed with the very sentence the command ended with.
    engine = sa.create_engine(settings.database_url)
    with engine.connect() as conn:
        recorded = conn.execute(sa.text("SELECT status, failure FROM scoring_runs")).one()
    engine.dispose()
    assert tuple(recorded) == ("failed", line.removeprefix("sim-pipeline: error: "))


def test_a_full_disk_under_a_sqlite_database_ends_in_one_sentence(
        tmp_path: Path, settings: Settings, image_server: ImageServer, small_disk: callable,
        capsys: pytest.CaptureFixture[str]) -> None:
    disk = small_disk("db", "160k")
    source = long_rows(tmp_path, image_server, "full-db", 40, "words that fill it " * 300)
    database = f"sqlite:///{disk / 'results.db'}"
    assert score(source, settings.replace(database_url=database)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "results database" in line and ("full" in line or "No space" in line)


def slow_routes(server: ImageServer, count: int, prefix: str) -> list[str]:
    body = make_image(77)
    return [server.add(f"/{prefix}/{i}.jpg", Route(body=body, delay=0.3)) for i in range(count)]


def requests_under(server: ImageServer, prefix: str) -> int:
    with server._lock:
        return sum(n for path, n in server.requests.items() if path.startswith(f"/{prefix}/"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_fetch_process_outlives_a_killed_run(
        sig: signal.Signals, tmp_path: Path, settings: Settings,
        image_server: ImageServer) -> None:
    prefix = f"orphans-{sig.name}"
    urls = slow_routes(image_server, 2200, prefix)
    source = write_cases(tmp_path / "pairs.csv", [Case(u, "a caption", None) for u in urls])
    command = [sys.executable, "-m", "sim_pipeline.cli", "score", str(source), "--quiet",
               "--model", settings.model, "--store", settings.store, "--database-url",
               settings.database_url, "--device", "cpu", "--allow-hosts", settings.allow_hosts,
               "--fetch-processes", "2", "--fetch-concurrency", "16", "--fetch-per-host", "16"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while requests_under(image_server, prefix) < 40:  # both workers are downloading
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    workers = children(process.pid)
    assert len(workers) >= 2, "the fetch workers were not found"
    process.send_signal(sig)
    status = process.wait(timeout=15)
    time.sleep(1.0)  # requests already on the wire may still arrive
    after_kill = requests_under(image_server, prefix)
    time.sleep(3.0)
    assert requests_under(image_server, prefix) == after_kill, "a worker kept downloading"
    assert after_kill < len(urls)
    err = process.stderr.read()
    if sig == signal.SIGTERM:
        assert status == 143 and "stopped by SIGTERM" in err and "Traceback" not in err
    else:
        assert status == -signal.SIGKILL
    assert not [pid for pid in workers if alive(pid)], "a fetch worker outlived the run"


def children(parent: int) -> list[int]:
    """The live processes whose parent is ``parent`` (field 4 of /proc/PID/stat)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
