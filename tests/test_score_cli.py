"""``sim-pipeline score`` end to end: real HTTP, real model code, real results table (SQLite)."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from sim_pipeline import cli
from sim_pipeline.core.config import Settings
from sim_pipeline.core.layout import EMBED_TEXTS
from sim_pipeline.stages.registry import CHUNK_STAGES, Stage
from tests.conftest import ImageServer
from tests.pairs import Case, mixed_cases, read_csv, serve_good_images, write_cases


def score(source: Path, settings: Settings, *extra: str) -> int:
    return cli.main(["score", str(source), "--quiet", "--model", settings.model,
                     "--store", settings.store, "--database-url", settings.database_url,
                     "--device", settings.device, "--fetch-timeout", str(settings.fetch_timeout),
                     "--batch-size", str(settings.batch_size), "--precision", settings.precision,
                     "--allow-hosts", settings.allow_hosts, *extra])


def table_rows(database_url: str) -> list[tuple]:
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT run_id, row_number, image_url, caption, similarity, error "
            "FROM similarity_scores ORDER BY run_id, row_number")).all()
    engine.dispose()
    return [tuple(r) for r in rows]


@pytest.fixture(scope="module")
def cases(image_server: ImageServer) -> list[Case]:
    return mixed_cases(image_server, prefix="cli")


def test_scores_every_row_in_order_with_input_columns_untouched(
        tmp_path: Path, settings: Settings, cases: list[Case],
        capsys: pytest.CaptureFixture[str]) -> None:
    source = write_cases(tmp_path / "pairs.csv", cases)
    assert score(source, settings, "--chunk-size", "20") == 0

    output = read_csv(tmp_path / "pairs_scored.csv")
    inputs = read_csv(source)
    assert output[0] == [*inputs[0], "similarity", "error"]
    assert len(output) == len(inputs) == len(cases) + 1
    for case, before, after in zip(cases, inputs[1:], output[1:], strict=True):
        assert after[:-2] == before
        similarity, error = after[-2:]
        assert (error or None) == case.expected_error, case
        if error:
            assert similarity == ""
        else:
            assert 0.0 <= float(similarity) <= 1.0
            assert len(similarity.split(".")[1]) == 4
    summary = capsys.readouterr().out
    assert f"{len(cases)}: " in summary and "http_404 1" in summary
    report = (tmp_path / "pairs_scored_report.html").read_text(encoding="utf-8")
    assert "<svg" in report and "http_404" in report


def test_results_table_holds_one_row_per_input_row(tmp_path: Path, settings: Settings,
                                                   cases: list[Case]) -> None:
    source = write_cases(tmp_path / "pairs.csv", cases)
    assert score(source, settings) == 0
    rows = table_rows(settings.database_url)
    assert [r[1] for r in rows] == list(range(len(cases)))
    for case, (_, _, url, _, similarity, error) in zip(cases, rows, strict=True):
        assert url == case.url.strip()
        assert error == case.expected_error
        assert (similarity is None) == (error is not None)


def test_rerun_sends_no_requests_and_duplicates_no_rows(
        tmp_path: Path, settings: Settings, cases: list[Case], image_server: ImageServer) -> None:
    source = write_cases(tmp_path / "pairs.csv", cases)
    assert score(source, settings) == 0
    first_output = (tmp_path / "pairs_scored.csv").read_bytes()
    first_rows = table_rows(settings.database_url)
    before = image_server.total_requests()

    assert score(source, settings) == 0
    assert image_server.total_requests() == before
    assert table_rows(settings.database_url) == first_rows
    assert (tmp_path / "pairs_scored.csv").read_bytes() == first_output


def test_repeated_urls_are_fetched_once(tmp_path: Path, settings: Settings,
                                        image_server: ImageServer) -> None:
    (url,) = serve_good_images(image_server, 1, prefix="repeat")
    path = url.removeprefix(image_server.url(""))
    source = write_cases(tmp_path / "pairs.csv",
                         [Case(url, f"caption {i}", None) for i in range(12)])
    assert score(source, settings, "--chunk-size", "5") == 0
    assert image_server.requests[path] == 1


def test_same_input_gives_the_same_output_bytes(tmp_path: Path, settings: Settings,
                                                cases: list[Case]) -> None:
    source = write_cases(tmp_path / "pairs.csv", cases)
    outputs = []
    for name in ("a", "b"):
        fresh = settings.replace(store=str(tmp_path / f"store-{name}"),
                                 database_url=f"sqlite:///{tmp_path / name}.db")
        assert score(source, fresh, "-o", str(tmp_path / f"{name}.csv")) == 0
        outputs.append((tmp_path / f"{name}.csv").read_bytes())
    assert outputs[0] == outputs[1]


def test_a_crash_halfway_is_completed_by_a_rerun(
        tmp_path: Path, settings: Settings, image_server: ImageServer,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    urls = serve_good_images(image_server, 12, prefix="crash")
    source = write_cases(tmp_path / "pairs.csv",
                         [Case(u, f"caption {i}", None) for i, u in enumerate(urls)])
    real = CHUNK_STAGES[EMBED_TEXTS].run

    def crash_on_second_chunk(chunk, store, settings, results):  # noqa: ANN001, ANN202
        if chunk.index == 1:
            raise RuntimeError("simulated crash")
        return real(chunk, store, settings, results)

    monkeypatch.setitem(CHUNK_STAGES, EMBED_TEXTS, Stage(EMBED_TEXTS, crash_on_second_chunk))
    assert score(source, settings, "--chunk-size", "5") == 1
    assert "unexpected RuntimeError: simulated crash; rerun with --debug" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="simulated crash"):
        score(source, settings, "--chunk-size", "5", "--debug")
    assert not (tmp_path / "pairs_scored.csv").exists()
    fetched = image_server.total_requests()

    monkeypatch.setitem(CHUNK_STAGES, EMBED_TEXTS, Stage(EMBED_TEXTS, real))
    assert score(source, settings, "--chunk-size", "5") == 0
    output = read_csv(tmp_path / "pairs_scored.csv")
    assert len(output) == 13 and all(row[-1] == "" for row in output[1:])
    assert image_server.total_requests() == fetched  # every chunk was fetched before the crash
    assert [r[1] for r in table_rows(settings.database_url)] == list(range(12))


def test_a_model_that_cannot_load_names_the_setting(
        tmp_path: Path, settings: Settings, image_server: ImageServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    (url,) = serve_good_images(image_server, 1, prefix="nomodel")
    source = write_cases(tmp_path / "pairs.csv", [Case(url, "a caption", None)])
    bad = settings.replace(model=str(tmp_path / "no-such-model"))
    fetched = image_server.total_requests()
    assert score(source, bad, "--run-id", "no-model") == 2
    err = capsys.readouterr().err.strip()
    assert "SIM_PIPELINE_MODEL" in err and "no-such-model" in err
    assert len(err.splitlines()) == 1
    assert image_server.total_requests() == fetched, "stopped before any fetch"
    engine = sa.create_engine(settings.database_url)
    with engine.connect() as conn:
        status, failure = conn.execute(sa.text(
            "SELECT status, failure FROM scoring_runs WHERE run_id = 'no-model'")).one()
    engine.dispose()
    assert (status, f"sim-pipeline: error: {failure}") == ("failed", err)


def test_fetch_only_warms_the_cache_for_a_later_score(
        tmp_path: Path, settings: Settings, image_server: ImageServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    urls = serve_good_images(image_server, 4, prefix="warmup")
    source = write_cases(tmp_path / "pairs.csv", [Case(u, "a caption", None) for u in urls]
                         + [Case(image_server.url("/warmup/missing.jpg"), "gone", "http_404")])
    flags = ["--store", settings.store, "--model", settings.model, "--precision",
             settings.precision, "--allow-hosts", settings.allow_hosts, "--quiet"]
    assert cli.main(["fetch", str(source), *flags]) == 0
    out = capsys.readouterr().out
    assert "5 downloaded (4 ok" in out and "http_404 1" in out
    assert not (tmp_path / "pairs_scored.csv").exists()
    before = image_server.total_requests()
    assert score(source, settings) == 0
    assert image_server.total_requests() == before
    assert len(read_csv(tmp_path / "pairs_scored.csv")) == 6


def test_outputs_are_created_with_the_usual_permissions_not_0600(
        tmp_path: Path, settings: Settings, image_server: ImageServer) -> None:
    (url,) = serve_good_images(image_server, 1, prefix="modes")
    source = write_cases(tmp_path / "pairs.csv", [Case(url, "a caption", None)])
    previous = os.umask(0o022)
    try:
        assert score(source, settings) == 0
    finally:
        os.umask(previous)
    for name in ("pairs_scored.csv", "pairs_scored_report.html"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_the_model_check_runs_beside_planning(
        tmp_path: Path, settings: Settings, cases: list[Case],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The check's first torch and transformers imports take seconds on a cold machine: the
    input is planned meanwhile, in the calling thread."""
    import threading

    from sim_pipeline.runners import lifecycle
    from sim_pipeline.stages.embed import families

    threads: dict[str, str] = {}
    real_check, real_plan = families.checked_family, lifecycle.plan_csv

    def check(*args: object, **kwargs: object) -> str:
        threads["check"] = threading.current_thread().name
        return real_check(*args, **kwargs)

    def plan(*args: object, **kwargs: object) -> object:
        threads["plan"] = threading.current_thread().name
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(families, "checked_family", check)
    monkeypatch.setattr(lifecycle, "plan_csv", plan)
    assert score(write_cases(tmp_path / "pairs.csv", cases[:3]), settings) == 0
    assert threads["check"].startswith("model-check")
    assert threads["plan"] == threading.main_thread().name


def test_a_runs_recorded_start_comes_before_its_model_check(
        tmp_path: Path, settings: Settings, cases: list[Case],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's "took" is its whole wall time: the model check (seconds on a cold cache) counts."""
    from sim_pipeline.stages.embed import families

    checked_at: list[datetime] = []
    real_check = families.checked_family

    def timed_check(*args: object, **kwargs: object) -> str:
        checked_at.append(datetime.now(UTC))
        return real_check(*args, **kwargs)

    monkeypatch.setattr(families, "checked_family", timed_check)
    source = write_cases(tmp_path / "pairs.csv", cases[:3])
    assert score(source, settings) == 0
    engine = sa.create_engine(settings.database_url)
    with engine.connect() as conn:
        started, finished = conn.execute(sa.text(
            "SELECT started_at, finished_at FROM scoring_runs")).one()
    engine.dispose()
    assert checked_at, "the model was checked"
    as_utc = datetime.fromisoformat(str(started)).replace(tzinfo=UTC)
    assert as_utc <= checked_at[0]
    assert finished is not None
