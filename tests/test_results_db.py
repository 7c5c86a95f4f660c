"""The results table on a real PostgreSQL and on SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from sim_pipeline.core.config import Settings
from sim_pipeline.results.db import ResultsDB, apply_schema, masked, schema_files
from tests.conftest import ImageServer
from tests.pairs import Case, mixed_cases, serve_good_images, write_cases
from tests.test_score_cli import score


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.db'}"
    return request.getfixturevalue("pg_url")


def query(url: str, sql: str, **params: object) -> list[tuple]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(sa.text(sql), params)]
    engine.dispose()
    return rows


def test_cli_run_lands_one_row_per_input_row_in_postgres(
        tmp_path: Path, settings: Settings, image_server: ImageServer, pg_url: str) -> None:
    cases = mixed_cases(image_server, prefix="pg")
    source = write_cases(tmp_path / "pairs.csv", cases)
    pg = settings.replace(database_url=pg_url)
    assert score(source, pg, "--run-id", "pg-e2e") == 0
    assert score(source, pg, "--run-id", "pg-e2e") == 0  # a rerun replaces, never duplicates

    rows = query(pg_url, "SELECT row_number, error, similarity FROM similarity_scores "
                         "WHERE run_id = 'pg-e2e' ORDER BY row_number")
    assert [r[0] for r in rows] == list(range(len(cases)))
    assert [r[1] for r in rows] == [c.expected_error for c in cases]
    ((status, total, ok, failed, finished),) = query(
        pg_url, "SELECT status, rows_total, rows_ok, rows_error, finished_at IS NOT NULL "
                "FROM scoring_runs WHERE run_id = 'pg-e2e'")
    expected_failed = sum(1 for c in cases if c.expected_error)
    assert (status, total, ok, failed, finished) == (
        "succeeded", len(cases), len(cases) - expected_failed, expected_failed, True)


def test_schema_is_applied_once(database_url: str) -> None:
    engine = sa.create_engine(database_url)
    ResultsDB(database_url)  # applies on first use
    assert apply_schema(engine) == []
    names = [r[0] for r in query(database_url, "SELECT name FROM schema_migrations")]
    assert names == [p.name for p in schema_files(engine.dialect.name)]
    engine.dispose()


def test_a_shorter_replanned_input_leaves_no_stale_rows(
        tmp_path: Path, settings: Settings, image_server: ImageServer, database_url: str) -> None:
    urls = serve_good_images(image_server, 6, prefix=f"replan-{database_url[:5]}")
    db = settings.replace(database_url=database_url)
    source = tmp_path / "day.csv"
    write_cases(source, [Case(u, f"caption {i}", None) for i, u in enumerate(urls)])
    assert score(source, db, "--run-id", "nightly") == 0
    write_cases(source, [Case(u, f"new caption {i}", None) for i, u in enumerate(urls[:4])])
    assert score(source, db, "--run-id", "nightly") == 0
    rows = query(database_url, "SELECT row_number, caption FROM similarity_scores "
                               "WHERE run_id = 'nightly' ORDER BY row_number")
    assert rows == [(i, f"new caption {i}") for i in range(4)]


def test_database_urls_are_shown_without_passwords() -> None:
    shown = masked("postgresql+psycopg://scorer:s3cret@db.internal:5432/results")
    assert "s3cret" not in shown and "scorer" in shown


def test_an_unreachable_database_is_one_clear_sentence(
        tmp_path: Path, settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_cases(tmp_path / "pairs.csv", [Case("http://127.0.0.1:9/x.jpg", "c", None)])
    unreachable = settings.replace(
        database_url="postgresql://postgres:hunter2@127.0.0.1:9/none")
    assert score(source, unreachable) == 2
    err = capsys.readouterr().err.strip()
    assert "Cannot use the results database" in err and "hunter2" not in err
    assert len(err.splitlines()) == 1
