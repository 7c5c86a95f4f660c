"""The results table people query: schema, run bookkeeping and per-chunk upserts.

PostgreSQL is the production target, SQLite the embedded default. Each chunk's rows are upserted
in one transaction keyed by (run_id, row_number), so a retried chunk replaces its rows instead of
duplicating them, and a killed writer leaves the whole chunk or none of it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from sim_pipeline.errors import UserError

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
UPSERT_BATCH = 2000

metadata = sa.MetaData()
scoring_runs = sa.Table(
    "scoring_runs", metadata,
    sa.Column("run_id", sa.Text, primary_key=True),
    sa.Column("source", sa.Text), sa.Column("model", sa.Text),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("status", sa.Text), sa.Column("rows_total", sa.BigInteger),
    sa.Column("rows_ok", sa.BigInteger), sa.Column("rows_error", sa.BigInteger),
)
similarity_scores = sa.Table(
    "similarity_scores", metadata,
    sa.Column("run_id", sa.Text, primary_key=True),
    sa.Column("row_number", sa.BigInteger, primary_key=True),
    sa.Column("image_url", sa.Text), sa.Column("url_hash", sa.Text),
    sa.Column("caption", sa.Text), sa.Column("caption_hash", sa.Text),
    sa.Column("model", sa.Text), sa.Column("similarity", sa.Float),
    sa.Column("cosine", sa.Float), sa.Column("error", sa.Text),
    sa.Column("scored_at", sa.DateTime(timezone=True)),
)


def normalise_url(url: str) -> str:
    """Accept the usual spellings; ``postgresql://`` means psycopg 3, the driver we ship."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def masked(url: str | sa.URL) -> str:
    """The database URL with its password hidden, fit for logs and error messages."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<unparseable database URL>"


def _schema_files() -> list[Path]:
    return sorted(SQL_DIR.glob("[0-9][0-9][0-9]_*.sql"))


def _statements(sql: str) -> list[str]:
    lines = [line.split("--", 1)[0] for line in sql.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def apply_schema(engine: Engine) -> list[str]:
    """Apply the numbered files of ``sql/`` not yet recorded; returns the names applied."""
    applied: list[str] = []
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('sim_pipeline_schema'))"))
        conn.execute(sa.text(
            "CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, "
            "applied_at TIMESTAMP WITH TIME ZONE NOT NULL)"))
        done = set(conn.execute(sa.text("SELECT name FROM schema_migrations")).scalars())
        for path in _schema_files():
            if path.name in done:
                continue
            for statement in _statements(path.read_text(encoding="utf-8")):
                conn.execute(sa.text(statement))
            conn.execute(sa.text("INSERT INTO schema_migrations (name, applied_at) "
                                 "VALUES (:name, :at)"), {"name": path.name, "at": _now()})
            applied.append(path.name)
    return applied


def _now() -> datetime:
    return datetime.now(UTC)


def _upsert(conn: Connection, table: sa.Table, rows: list[Mapping[str, Any]]) -> None:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table)
    keys = [c.name for c in table.primary_key.columns]
    updates = {c.name: statement.excluded[c.name] for c in table.columns if c.name not in keys}
    conn.execute(statement.on_conflict_do_update(index_elements=keys, set_=updates), rows)


class ResultsDB:
    """The results database behind ``SIM_PIPELINE_DATABASE_URL``; schema applied on first use."""

    def __init__(self, url: str) -> None:
        self.url = normalise_url(url)
        self.engine = _engine(self.url)

    def start_run(self, run_id: str, source: str, model: str, rows_total: int) -> None:
        """Open (or reopen) a run; rows past the end of a re-planned, shorter input go away."""
        with self.engine.begin() as conn:
            conn.execute(similarity_scores.delete().where(
                similarity_scores.c.run_id == run_id,
                similarity_scores.c.row_number >= rows_total))
            _upsert(conn, scoring_runs, [{
                "run_id": run_id, "source": source, "model": model, "started_at": _now(),
                "finished_at": None, "status": "running", "rows_total": rows_total,
                "rows_ok": None, "rows_error": None}])

    def finish_run(self, run_id: str, status: str) -> None:
        """Close the run, counting its rows from the table itself (the source of truth)."""
        counts = sa.select(
            sa.func.count().filter(similarity_scores.c.error.is_(None)),
            sa.func.count().filter(similarity_scores.c.error.is_not(None)),
        ).where(similarity_scores.c.run_id == run_id)
        with self.engine.begin() as conn:
            ok, failed = conn.execute(counts).one()
            conn.execute(scoring_runs.update().where(scoring_runs.c.run_id == run_id).values(
                status=status, finished_at=_now(), rows_ok=ok, rows_error=failed))

    def upsert_scores(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Write one chunk's rows in a single transaction: all of them or none."""
        scored_at, count = _now(), 0
        with self.engine.begin() as conn:
            batch: list[Mapping[str, Any]] = []
            for row in rows:
                batch.append({**row, "scored_at": scored_at})
                if len(batch) == UPSERT_BATCH:
                    _upsert(conn, similarity_scores, batch)
                    count, batch = count + len(batch), []
            if batch:
                _upsert(conn, similarity_scores, batch)
                count += len(batch)
        return count


@functools.lru_cache(maxsize=8)
def _engine(url: str) -> Engine:
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise UserError(f"SIM_PIPELINE_DATABASE_URL is not a database URL: {masked(url)}.") \
            from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = sa.create_engine(parsed, pool_pre_ping=True)
        apply_schema(engine)
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
        raise UserError(f"Cannot use the results database {masked(parsed)}: {reason}.") from None
    except (ImportError, sa.exc.NoSuchModuleError) as error:
        raise UserError(f"No driver for the results database {masked(parsed)}: {error}.") \
            from None
    return engine
