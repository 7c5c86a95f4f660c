"""Tests need PostgreSQL installed, not running: the session starts its own when none answers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from sim_pipeline.results.db import ResultsDB
from tests.support import postgres

REPO = Path(__file__).resolve().parent.parent


def binaries_or_skip() -> None:
    """These tests are the self-started path: without its programs they fail, saying why."""
    try:
        postgres.find_binaries()
    except postgres.PostgresUnavailable as missing:
        pytest.fail(str(missing), pytrace=False)


def test_a_throwaway_cluster_serves_the_results_table_and_is_gone_after() -> None:
    binaries_or_skip()
    with postgres.throwaway_cluster() as admin:
        assert sa.make_url(admin).port != 5432
        with postgres.database(admin) as url:
            db = ResultsDB(url)  # applies the packaged migrations
            with sa.create_engine(url).connect() as conn:
                tables = set(sa.inspect(conn).get_table_names())
            assert {"similarity_scores", "scoring_runs", "schema_migrations"} <= tables
            db.engine.dispose()
    assert not postgres.answers(admin)


def test_pg_fixtures_start_a_cluster_when_nothing_answers_on_the_admin_url() -> None:
    """The whole path, as `make test` takes it on a machine whose PostgreSQL is stopped."""
    binaries_or_skip()
    dead = f"postgresql+psycopg://postgres@127.0.0.1:{postgres.free_port()}/postgres"
    env = {**os.environ, postgres.ADMIN_URL_ENV: dead}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_results_db.py", "-k", "postgresql"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
