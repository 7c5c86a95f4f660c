"""The results table's schema and writes, on a real PostgreSQL and on SQLite.

Migrations from empty and re-applied, an upgrade that keeps rows, idempotent chunk upserts, a
writer killed inside its transaction, two writer processes at once, stale runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from sim_pipeline.core.layout import sha256_hex
from sim_pipeline.results.db import (
    ResultsDB,
    apply_schema,
    schema_files,
    scoring_runs,
    similarity_scores,
)
from sim_pipeline.results.query import (
    delete_runs,
    get_run,
    latest_scores,
    list_runs,
    prunable_runs,
    stage_times,
)
from tests.support import postgres

REPO = Path(__file__).resolve().parent.parent
CHUNK = 500


def chunk_rows(run_id: str, chunk: int, size: int = CHUNK, model: str = "m",
               shift: float = 0.0) -> list[dict[str, object]]:
    """A chunk as join-score writes it; every 7th row failed. Same arguments, same rows."""
    rows = []
    for number in range(chunk * size, (chunk + 1) * size):
        url, caption = f"http://img.test/{number % 97}.jpg", f"caption {number}, \"quoted\""
        failed = number % 7 == 0
        rows.append({
            "run_id": run_id, "row_number": number, "image_url": url,
            "url_hash": sha256_hex(url), "caption": caption, "caption_hash": sha256_hex(caption),
            "model": model, "similarity": None if failed else round(0.5 + shift + number % 90
                                                                    / 1000, 4),
            "cosine": None if failed else 0.1, "error": "http_404" if failed else None,
            "input_fields": [f"id-{number}", url, caption]})
    return rows


def writer_main() -> None:
    """A writer in its own process (tests start it with ``python -c``).

    ``hang URL RUN MARKER``: commit chunk 0, then stop inside chunk 1's transaction, just before
    its commit, and wait to be killed. ``write URL SHARED OWN FIRST LAST GO``: once GO exists, write
    chunks FIRST..LAST of the run SHARED (which the other writer also writes) and of the run OWN.
    """
    mode, url, *rest = sys.argv[1:]
    if mode == "hang":
        run_id, marker = rest
        db = ResultsDB(url)
        db.upsert_scores(chunk_rows(run_id, 0))

        @sa.event.listens_for(db.engine, "commit")
        def hang(conn: sa.Connection) -> None:
            Path(marker).write_text("inside the transaction")
            time.sleep(120)

        db.upsert_scores(chunk_rows(run_id, 1))
        return
    shared, own, first, last, go = rest
    while not Path(go).exists():
        time.sleep(0.01)
    db = ResultsDB(url)  # both processes apply the schema to an empty database at once
    total = (int(last) + 1) * CHUNK * 2
    for run_id in (shared, own):
        db.start_run(run_id, "pairs.csv", "m", total, ["id", "url", "caption"], ",")
    for chunk in range(int(first), int(last) + 1):
        for run_id in (shared, own):
            db.upsert_scores(chunk_rows(run_id, chunk))
            db.record_stage(run_id, "join-score", chunk, 0.01)


def start_writer(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", "from tests.test_results_storage import writer_main; "
                               "writer_main()", *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with nothing in it: a new one on the local PostgreSQL, or a new SQLite file."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    with postgres.database(request.getfixturevalue("pg_admin_url"), "sim_fresh") as url:
        yield url


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.db'}"
    return request.getfixturevalue("pg_url")


def fetch(url: str, query: sa.Executable) -> list[tuple]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(query)]
    engine.dispose()
    return rows


def run_rows(url: str, run_id: str) -> list[tuple]:
    c = similarity_scores.c
    return fetch(url, sa.select(c.row_number, c.similarity, c.error, c.input_fields)
                 .where(c.run_id == run_id).order_by(c.row_number))


def test_migrations_from_empty_build_every_table_index_and_the_view(empty_database: str) -> None:
    ResultsDB(empty_database)
    inspector = sa.inspect(sa.create_engine(empty_database))
    assert {"schema_migrations", "scoring_runs", "similarity_scores", "stage_timings"} <= set(
        inspector.get_table_names())
    assert "latest_similarity_scores" in inspector.get_view_names()
    indexes = {i["name"]: i["column_names"] for i in inspector.get_indexes("similarity_scores")}
    assert indexes["similarity_scores_url_hash"] == ["url_hash"]
    assert indexes["similarity_scores_caption_model"] == ["caption_hash", "model"]
    assert indexes["similarity_scores_scored_at"] == ["scored_at"]
    assert {c["name"] for c in inspector.get_columns("similarity_scores")} >= {"input_fields"}
    if inspector.dialect.name == "postgresql":  # 003: no per-row foreign key check on writes
        assert inspector.get_foreign_keys("similarity_scores") == []
    assert {c["name"] for c in inspector.get_columns("scoring_runs")} >= {
        "input_columns", "input_delimiter", "updated_at"}

    engine = sa.create_engine(empty_database)
    files = [p.name for p in schema_files(engine.dialect.name)]
    assert "002_query_side.sql" in files
    assert apply_schema(engine) == []  # re-applying is a no-op
    assert [r[0] for r in fetch(empty_database, sa.text(
        "SELECT name FROM schema_migrations ORDER BY name"))] == files


def test_upgrading_a_001_database_keeps_its_rows(empty_database: str) -> None:
    engine = sa.create_engine(empty_database)
    assert apply_schema(engine, upto="001_results.sql") == ["001_results.sql"]
    old = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    with engine.begin() as conn:  # what the 001 code wrote: no input fields, no heartbeat
        conn.execute(sa.insert(scoring_runs), [{
            "run_id": "old", "source": "old.csv", "model": "m", "started_at": old,
            "finished_at": old + timedelta(minutes=5), "status": "succeeded", "rows_total": 3,
            "rows_ok": 2, "rows_error": 1}])
        conn.execute(sa.insert(similarity_scores), [
            {k: v for k, v in row.items() if k != "input_fields"} | {"scored_at": old}
            for row in chunk_rows("old", 0, size=3)])
    c = similarity_scores.c
    kept = sa.select(c.row_number, c.image_url, c.caption, c.similarity, c.error, c.scored_at) \
        .where(c.run_id == "old").order_by(c.row_number)
    before = fetch(empty_database, kept)
    assert len(before) == 3

    db = ResultsDB(empty_database)  # upgrades on first use
    assert fetch(empty_database, kept) == before
    assert [r[3] for r in run_rows(empty_database, "old")] == [None, None, None]
    run = get_run(db, "old")
    assert (run.status, run.rows_ok, run.rows_error, run.input_columns) == (
        "succeeded", 2, 1, None)
    assert run.duration(datetime.now(UTC)) == timedelta(minutes=5)
    assert latest_scores(db, url_hash=sha256_hex("http://img.test/1.jpg"))[0].run_id == "old"


def test_upserting_a_chunk_twice_replaces_it(database_url: str) -> None:
    db = ResultsDB(database_url)
    db.start_run("twice", "pairs.csv", "m", 2 * CHUNK)
    assert db.upsert_scores(chunk_rows("twice", 0)) == CHUNK
    assert db.upsert_scores(chunk_rows("twice", 1)) == CHUNK
    first = run_rows(database_url, "twice")
    assert db.upsert_scores(chunk_rows("twice", 0)) == CHUNK
    assert run_rows(database_url, "twice") == first

    assert db.upsert_scores(chunk_rows("twice", 1, shift=0.25)) == CHUNK
    again = run_rows(database_url, "twice")
    assert len(again) == 2 * CHUNK and again[:CHUNK] == first[:CHUNK]
    assert [r[1] for r in again[CHUNK:]] == [None if r[1] is None else round(r[1] + 0.25, 4)
                                             for r in first[CHUNK:]]
    assert json.loads(again[1][3]) == ["id-1", "http://img.test/1.jpg", 'caption 1, "quoted"']


def test_scattered_and_repeated_rows_replace_exactly_their_keys(database_url: str) -> None:
    db = ResultsDB(database_url)
    run_id = f"scattered-{uuid.uuid4().hex[:6]}"
    db.start_run(run_id, "pairs.csv", "m", CHUNK)
    db.upsert_scores(chunk_rows(run_id, 0, size=10))
    before = run_rows(database_url, run_id)
    changed = [r for r in chunk_rows(run_id, 0, size=10, shift=0.3) if r["row_number"] in (8, 2, 5)]
    stale_copy = {**changed[0], "similarity": 0.0001, "error": None}
    written = db.upsert_scores([stale_copy, *reversed(changed)])  # out of order, 2 repeated
    assert written == 3
    after = run_rows(database_url, run_id)
    assert [r[0] for r in after] == list(range(10))
    assert [r for r in after if r[0] not in (2, 5, 8)] == [
        r for r in before if r[0] not in (2, 5, 8)]
    assert [r[1] for r in after if r[0] in (2, 5, 8)] == [
        round(r[1] + 0.3, 4) for r in before if r[0] in (2, 5, 8)]


def test_the_latest_view_holds_the_newest_result_per_url_caption_and_model(
        database_url: str) -> None:
    db = ResultsDB(database_url)
    url, tag = "http://img.test/5.jpg", uuid.uuid4().hex[:6]
    for run_id, model, shift in (("latest-a", f"m-{tag}", 0.0), ("latest-b", f"m-{tag}", 0.1),
                                 ("latest-c", f"other-{tag}", 0.2)):
        db.start_run(run_id, "pairs.csv", model, CHUNK)
        db.upsert_scores(chunk_rows(run_id, 0, model=model, shift=shift))
        time.sleep(0.01)
    found = latest_scores(db, url_hash=sha256_hex(url), model=f"m-{tag}", limit=100)
    assert {s.run_id for s in found} == {"latest-b"}
    assert len(found) == 6  # rows 5, 102, 199, 296, 393, 490: six captions with that image
    scores = [s.similarity for s in found]
    assert scores[:-1] == sorted(scores[:-1], reverse=True) and found[-1].error == "http_404"
    both = latest_scores(db, caption_hash=sha256_hex('caption 5, "quoted"'))
    assert sorted((s.model, s.run_id) for s in both if s.model.endswith(tag)) == [
        (f"m-{tag}", "latest-b"), (f"other-{tag}", "latest-c")]


def test_a_writer_killed_inside_its_transaction_leaves_no_partial_chunk(
        database_url: str, tmp_path: Path) -> None:
    run_id = f"killed-{uuid.uuid4().hex[:6]}"
    db = ResultsDB(database_url)
    db.start_run(run_id, "pairs.csv", "m", 2 * CHUNK)
    marker = tmp_path / "inside"
    writer = start_writer("hang", database_url, run_id, str(marker))
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert writer.poll() is None, writer.communicate()[0].decode()
        assert time.monotonic() < deadline, "the writer never reached its commit"
        time.sleep(0.02)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(10)

    assert [r[0] for r in run_rows(database_url, run_id)] == list(range(CHUNK))  # chunk 0 only
    assert db.upsert_scores(chunk_rows(run_id, 1)) == CHUNK  # the retry goes through, whole
    assert [r[0] for r in run_rows(database_url, run_id)] == list(range(2 * CHUNK))


def test_two_writer_processes_at_once_lose_nothing(empty_database: str, tmp_path: Path) -> None:
    go = tmp_path / "go"
    writers = [start_writer("write", empty_database, "shared", "own-a", "0", "7", str(go)),
               start_writer("write", empty_database, "shared", "own-b", "4", "11", str(go))]
    time.sleep(0.3)  # let both import and wait for the start signal
    go.write_text("go")
    for writer in writers:
        output, _ = writer.communicate(timeout=120)
        assert writer.returncode == 0, output.decode()

    def numbers(run_id: str) -> list[int]:
        return [r[0] for r in run_rows(empty_database, run_id)]

    assert numbers("shared") == list(range(12 * CHUNK))
    assert numbers("own-a") == list(range(8 * CHUNK))
    assert numbers("own-b") == list(range(4 * CHUNK, 12 * CHUNK))
    expected = {(r["row_number"], r["similarity"], r["error"]) for c in range(12)
                for r in chunk_rows("shared", c)}
    assert {r[:3] for r in run_rows(empty_database, "shared")} == expected
    db = ResultsDB(empty_database)
    assert [(t.stage, t.chunks) for t in stage_times(db, "own-b")] == [("join-score", 8)]
    names = [r[0] for r in fetch(empty_database, sa.text("SELECT name FROM schema_migrations"))]
    assert sorted(names) == [p.name for p in schema_files(db.engine.dialect.name)]


def test_a_running_run_without_a_heartbeat_is_shown_stale(database_url: str) -> None:
    db = ResultsDB(database_url)
    run_id = f"quiet-{uuid.uuid4().hex[:6]}"
    db.start_run(run_id, "pairs.csv", "m", CHUNK)
    db.upsert_scores(chunk_rows(run_id, 0, size=10))
    now = datetime.now(UTC)
    assert get_run(db, run_id).state(now) == "running"
    assert (get_run(db, run_id).rows_ok, get_run(db, run_id).rows_error) == (8, 2)  # live

    long_ago = now - timedelta(hours=2)
    with db.engine.begin() as conn:
        conn.execute(scoring_runs.update().where(scoring_runs.c.run_id == run_id)
                     .values(started_at=long_ago, updated_at=long_ago))
    run = next(r for r in list_runs(db, limit=1000) if r.run_id == run_id)
    assert run.state(now) == "stale"
    assert run.state(now, stale_after=timedelta(hours=3)) == "running"
    assert run.duration(now) == timedelta(0)  # to its last sign of life

    db.upsert_scores(chunk_rows(run_id, 0, size=10))  # a chunk is a heartbeat
    assert get_run(db, run_id).state(datetime.now(UTC)) == "running"
    db.finish_run(run_id, "failed")
    assert get_run(db, run_id).state(datetime.now(UTC) + timedelta(days=1)) == "failed"


def test_pruning_picks_runs_by_their_last_sign_of_life(database_url: str) -> None:
    db = ResultsDB(database_url)
    tag = uuid.uuid4().hex[:6]
    now = datetime.now(UTC)
    for run_id, last in ((f"old-{tag}", now - timedelta(days=100)),
                         (f"new-{tag}", now - timedelta(days=2))):
        db.start_run(run_id, "pairs.csv", "m", 10)
        db.upsert_scores(chunk_rows(run_id, 0, size=10))
        db.record_stage(run_id, "plan", -1, 0.1)
        db.finish_run(run_id, "succeeded")
        with db.engine.begin() as conn:
            conn.execute(scoring_runs.update().where(scoring_runs.c.run_id == run_id).values(
                started_at=last - timedelta(hours=1), finished_at=last, updated_at=last))
    found = [(r.run_id, n) for r, n in prunable_runs(db, timedelta(days=90), now)
             if r.run_id.endswith(tag)]
    assert found == [(f"old-{tag}", 10)]
    assert delete_runs(db, [f"old-{tag}"]) == 10
    assert run_rows(database_url, f"old-{tag}") == [] and stage_times(db, f"old-{tag}") == []
    assert [r[0] for r in run_rows(database_url, f"new-{tag}")] == list(range(10))


def test_the_upsert_benchmark_stays_runnable(pg_url: str) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.db_upsert", "--rows", "2000", "--chunk",
                           "1000", "--database-url", pg_url], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "copy        insert" in done.stdout and "executemany re-upsert" in done.stdout
    assert not [r for r in list_runs(ResultsDB(pg_url), 1000) if r.run_id.startswith("bench-")]
