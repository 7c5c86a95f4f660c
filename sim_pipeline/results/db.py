"""The results table people query: schema, run bookkeeping and per-chunk upserts.

PostgreSQL is the production target, SQLite the embedded default. Each chunk's rows are upserted
in one transaction keyed by (run_id, row_number), so a retried chunk replaces its rows instead of
duplicating them, and a killed writer leaves the whole chunk or none of it. On PostgreSQL the rows
go in by binary COPY after a delete of the same keys, under a per-run advisory lock; elsewhere by
an ``executemany`` of ``INSERT ... ON CONFLICT DO UPDATE``. What people read back (runs, exports,
reports) is in ``results.query``.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from sim_pipeline.core.config import DEFAULT_RETRY_SECONDS
from sim_pipeline.core.errors import UserError
from sim_pipeline.results import binary_copy

# Numbered DDL files shipped inside the package (read as package data, so a wheel has them too).
MIGRATIONS = resources.files("sim_pipeline.results") / "migrations"
MIGRATION_NAME = re.compile(r"^[0-9]{3}_[A-Za-z0-9_]+(\.[a-z]+)?\.sql$")
RUN_LEVEL = -1  # stage_timings.chunk of the stages that run once per run (plan, finalize)
SQLITE_BUSY_TIMEOUT_S = 60  # how long a SQLite writer waits for another one to commit
RETRY_BACKOFF_MAX = 8.0
log = logging.getLogger(__name__)
W = TypeVar("W", bound=Callable[..., Any])

metadata = sa.MetaData()
scoring_runs = sa.Table(
    "scoring_runs", metadata,
    sa.Column("run_id", sa.Text, primary_key=True),
    sa.Column("source", sa.Text), sa.Column("model", sa.Text),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("status", sa.Text), sa.Column("rows_total", sa.BigInteger),
    sa.Column("rows_ok", sa.BigInteger), sa.Column("rows_error", sa.BigInteger),
    sa.Column("input_columns", sa.Text), sa.Column("input_delimiter", sa.Text),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
    sa.Column("error_bound_pairs", sa.Integer), sa.Column("error_bound_max", sa.Float),
    sa.Column("error_bound_p99", sa.Float),
    sa.Column("failure", sa.Text),  # migration 006: a failed run's sentence
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
    sa.Column("input_fields", sa.Text),
)
stage_timings = sa.Table(
    "stage_timings", metadata,
    sa.Column("run_id", sa.Text, primary_key=True),
    sa.Column("stage", sa.Text, primary_key=True),
    sa.Column("chunk", sa.Integer, primary_key=True),
    sa.Column("seconds", sa.Float), sa.Column("finished_at", sa.DateTime(timezone=True)),
)
latest_similarity_scores = sa.Table(  # view (migration 002): newest row per url, caption, model
    "latest_similarity_scores", sa.MetaData(),
    *(sa.Column(c.name, c.type) for c in similarity_scores.columns if c.name != "input_fields"),
)

# Drift (migration 004): each comparison of a run with a reference run, and the canary pairs
# scored with each run (results.drift, results.canaries).
score_drift = sa.Table(
    "score_drift", metadata,
    sa.Column("run_id", sa.Text, primary_key=True),
    sa.Column("against_run_id", sa.Text, primary_key=True),
    sa.Column("verdict", sa.Text), sa.Column("reasons", sa.Text),
    sa.Column("psi", sa.Float), sa.Column("ks_statistic", sa.Float),
    sa.Column("ks_pvalue", sa.Float), sa.Column("wasserstein", sa.Float),
    sa.Column("cutoff", sa.Float), sa.Column("share_above", sa.Float),
    sa.Column("against_share_above", sa.Float), sa.Column("scored_rows", sa.BigInteger),
    sa.Column("against_scored_rows", sa.BigInteger), sa.Column("error_shares", sa.Text),
    sa.Column("canaries", sa.Text), sa.Column("computed_at", sa.DateTime(timezone=True)),
)
canary_scores = sa.Table(
    "canary_scores", metadata,
    sa.Column("run_id", sa.Text, primary_key=True),
    sa.Column("row_number", sa.BigInteger, primary_key=True),
    sa.Column("image_url", sa.Text), sa.Column("caption", sa.Text),
    sa.Column("similarity", sa.Float), sa.Column("error", sa.Text),
    sa.Column("model", sa.Text), sa.Column("model_precision", sa.Text),
    sa.Column("model_backend", sa.Text),
)

SCORE_COLUMNS = [c.name for c in similarity_scores.columns]
_COPY_TYPES = ["text", "int8", "text", "text", "text", "text", "text", "float8", "float8", "text",
               "timestamptz", "text"]  # SCORE_COLUMNS' types, for binary COPY
_RUN_LOCK = 0x5C0  # advisory lock class of "writing a run's rows" (the key: hashtext(run_id))


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


def schema_files(dialect: str) -> list[Traversable]:
    """``NNN_name.sql`` apply to every database, ``NNN_name.<dialect>.sql`` to that one only."""
    found = [f for f in MIGRATIONS.iterdir() if MIGRATION_NAME.match(f.name)]
    return [f for f in sorted(found, key=lambda f: f.name)
            if f.name.split(".")[1:-1] in ([], [dialect])]


def _statements(sql: str) -> list[str]:
    lines = [line.split("--", 1)[0] for line in sql.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def apply_schema(engine: Engine, upto: str | None = None) -> list[str]:
    """Apply the numbered files of ``migrations/`` not yet recorded; returns the names applied.

    All of them in one transaction that holds the schema lock (PostgreSQL: an advisory lock;
    SQLite: ``BEGIN IMMEDIATE``), so two processes starting at once apply each file once. ``upto``
    stops after that file (tests use it to build an older schema).
    """
    applied: list[str] = []
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('sim_pipeline_schema'))"))
        elif conn.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # DDL inside the transaction, writers queued
        conn.execute(sa.text(
            "CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, "
            "applied_at TIMESTAMP WITH TIME ZONE NOT NULL)"))
        done = set(conn.execute(sa.text("SELECT name FROM schema_migrations")).scalars())
        for path in schema_files(conn.dialect.name):
            if upto is not None and path.name > upto:
                break
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


_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def storable(text: str | None) -> str | None:
    """``text`` with each NUL as U+FFFD: PostgreSQL text cannot hold NUL (nor can jsonb's
    ``\\u0000``), and SQLite's text functions stop at it; both databases store the same."""
    return text.replace("\0", "\ufffd") if text and "\0" in text else text


def _json(values: Sequence[str] | None) -> str | None:
    return None if values is None else _JSON([storable(v) for v in values])


def _upsert(conn: Connection, table: sa.Table, rows: list[Mapping[str, Any]],
            replace: bool = True) -> None:
    """Insert ``rows``; a row whose key exists replaces it, or (``replace=False``) is dropped."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table)
    keys = [c.name for c in table.primary_key.columns]
    if not replace:
        conn.execute(statement.on_conflict_do_nothing(index_elements=keys), rows)
        return
    updates = {c.name: statement.excluded[c.name] for c in table.columns if c.name not in keys}
    conn.execute(statement.on_conflict_do_update(index_elements=keys, set_=updates), rows)


def _opened_run(run_id: str, source: str, model: str, rows_total: int,
                columns: Sequence[str] | None, delimiter: str | None,
                started_at: datetime | None = None) -> dict[str, Any]:
    """A ``scoring_runs`` row for a run that starts now (or started at ``started_at``, before
    its input was checked and planned)."""
    now = _now()
    return {"run_id": run_id, "source": storable(source), "model": model,
            "started_at": started_at or now,
            "finished_at": None, "status": "running", "rows_total": rows_total,
            "rows_ok": None, "rows_error": None, "input_columns": _json(columns),
            "input_delimiter": delimiter, "updated_at": now, "failure": None}


def _lock_runs(conn: Connection, run_ids: Iterable[str]) -> None:
    """Writers of a run's rows take turns (PostgreSQL): two writers of the same chunk, one
    after the other, instead of colliding. Writers of different runs never wait for each other;
    locks are taken in run order, so a writer of several runs cannot deadlock with another."""
    if conn.dialect.name == "postgresql":
        for run_id in sorted(set(run_ids)):
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:cls, hashtext(:run_id))"),
                         {"cls": _RUN_LOCK, "run_id": run_id})


def _in_key_order(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One row per key (the last one wins), in key order; join-score's chunks already are."""
    rows = list(rows)
    keys = [(r["run_id"], r["row_number"]) for r in rows]
    if all(a < b for a, b in zip(keys, keys[1:], strict=False)):
        return rows
    latest = dict(zip(keys, rows, strict=True))
    return [latest[key] for key in sorted(latest)]


def _score_values(row: Mapping[str, Any], scored_at: datetime) -> tuple[Any, ...]:
    """A row as a tuple in ``SCORE_COLUMNS`` order."""
    return (row["run_id"], row["row_number"], storable(row["image_url"]), row.get("url_hash"),
            storable(row["caption"]), row["caption_hash"], row["model"], row.get("similarity"),
            row.get("cosine"), row.get("error"), scored_at, _json(row.get("input_fields")))


def _copy_replace(conn: Connection, rows: list[Mapping[str, Any]], scored_at: datetime) -> None:
    """PostgreSQL fast path: delete the rows' keys, then COPY the rows in (binary format).

    Same result as ``INSERT ... ON CONFLICT DO UPDATE``, at COPY speed: rows are encoded while
    the server stores the previous ones. The caller holds the runs' locks (``_lock_runs``), so no
    other writer inserts these keys in between.
    """
    numbers: dict[str, list[int]] = {}
    for row in rows:
        numbers.setdefault(row["run_id"], []).append(row["row_number"])
    with conn.connection.driver_connection.cursor() as cursor:
        for run_id, keys in numbers.items():  # keys ascending and distinct
            if keys[-1] - keys[0] + 1 == len(keys):  # a chunk: one range
                cursor.execute("DELETE FROM similarity_scores WHERE run_id = %s "
                               "AND row_number BETWEEN %s AND %s", [run_id, keys[0], keys[-1]])
            else:
                cursor.execute("DELETE FROM similarity_scores USING unnest(%s::bigint[]) AS k(n) "
                               "WHERE run_id = %s AND row_number = k.n", [keys, run_id])
        with cursor.copy(f"COPY similarity_scores ({', '.join(SCORE_COLUMNS)}) "
                         "FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(_COPY_TYPES)
            for row in rows:
                copy.write_row(_score_values(row, scored_at))


_JSON_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t",
                 "\b": "\\b", "\f": "\\f"}


def storable_column(values: pa.Array) -> pa.Array:
    """``storable`` over a column."""
    return pc.replace_substring(values, "\0", "\ufffd")


def json_lists(lists: pa.Array) -> pa.Array:
    """Each list of strings as ``_json`` writes it (compact JSON, non-ASCII kept), by columns."""
    values = storable_column(lists.flatten())
    for char in sorted(_controls_in(values), key=lambda c: c != "\\"):  # backslash first
        escape = _JSON_ESCAPES.get(char, f"\\u{ord(char):04x}")
        values = pc.replace_substring(values, char, escape)
    quoted = pc.binary_join_element_wise('"', values, '"', "")
    joined = pc.binary_join(pa.ListArray.from_arrays(lists.offsets, quoted), ",")
    return pc.binary_join_element_wise("[", joined, "]", "")


def _controls_in(values: pa.Array) -> set[str]:
    """The characters JSON escapes that occur in ``values`` (backslash first, then the rest)."""
    found = {c for c in ("\\", '"') if pc.any(pc.match_substring(values, c)).as_py()}
    if pc.any(pc.match_substring_regex(values, "[\x01-\x1f]")).as_py():
        found |= {chr(code) for code in range(1, 32)}
    return found


def _score_fields(run_id: str, model: str, rows: pa.Table, results: pa.Table,
                  scored_at: datetime) -> list[binary_copy.Field]:
    """A chunk's columns in ``SCORE_COLUMNS`` order, encoded for binary COPY."""
    similarity, cosine = results["similarity"].combine_chunks(), \
        results["cosine"].combine_chunks()
    null = similarity.is_null().to_numpy(zero_copy_only=False)

    def text(name: str, table: pa.Table = rows) -> pa.Array:
        return binary_copy.text_field(storable_column(table[name].combine_chunks()))

    return [binary_copy.text_constant(run_id),
            binary_copy.int8_field(rows["row"].to_numpy()),
            text("url"), text("url_hash"), text("caption"), text("caption_hash"),
            binary_copy.text_constant(model),
            binary_copy.float8_field(similarity.fill_null(0.0).to_numpy(), null),
            binary_copy.float8_field(cosine.fill_null(0.0).to_numpy(), null),
            text("error", results),
            binary_copy.timestamptz_constant(scored_at),
            binary_copy.text_field(json_lists(rows["fields"].combine_chunks()))]


def _column_rows(run_id: str, model: str, rows: pa.Table, results: pa.Table
                 ) -> list[dict[str, Any]]:
    """A chunk's columns as the rows ``upsert_scores`` takes (databases without binary COPY)."""
    data, scored = rows.to_pydict(), results.to_pydict()
    return [{"run_id": run_id, "row_number": number, "image_url": url, "url_hash": url_hash,
             "caption": caption, "caption_hash": caption_hash, "model": model,
             "similarity": similarity, "cosine": cosine, "error": error, "input_fields": fields}
            for number, url, url_hash, caption, caption_hash, fields, similarity, cosine, error
            in zip(data["row"], data["url"], data["url_hash"], data["caption"],
                   data["caption_hash"], data["fields"], scored["similarity"], scored["cosine"],
                   scored["error"], strict=True)]


class DatabaseUnavailable(UserError):
    """The results database stopped answering (or cannot be written) and retrying did not help."""


_NOT_TRANSIENT = ("disk is full", "no space left", "password authentication failed",
                  "does not exist", "permission denied", "read-only")


def _reason(error: sa.exc.DBAPIError) -> str:
    text = str(error.orig if error.orig is not None else error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _is_transient(error: sa.exc.DBAPIError) -> bool:
    """A lost or refused connection, a busy SQLite file: worth another try; a full disk, bad
    credentials or a missing database are not."""
    reason = _reason(error).lower()
    return not any(words in reason for words in _NOT_TRANSIENT)


def _retried(method: W) -> W:
    """Retry a write on transient database errors with exponential backoff, for at most
    ``retry_seconds``; then one sentence (``DatabaseUnavailable``). Every write method is
    idempotent (keyed upserts), so repeating one is safe."""

    @functools.wraps(method)
    def call(self: ResultsDB, *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + self.retry_seconds
        for attempt in itertools.count():
            try:
                return method(self, *args, **kwargs)
            except (sa.exc.OperationalError, sa.exc.InterfaceError) as error:
                left = deadline - time.monotonic()
                if not _is_transient(error) or left <= 0:
                    raise self.unavailable(error) from None
                wait = min(RETRY_BACKOFF_MAX, 0.25 * 2**attempt, left)
                log.warning("The results database failed (%s); retrying in %.1f s.",
                            _reason(error), wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    return call  # type: ignore[return-value]


class ResultsDB:
    """The results database behind ``SIM_PIPELINE_DATABASE_URL``; schema applied on first use.

    Writes retry transient failures (a restarting server, a dropped connection) for up to
    ``retry_seconds`` before giving up with one sentence.
    """

    def __init__(self, url: str, retry_seconds: float = DEFAULT_RETRY_SECONDS) -> None:
        self.url = normalise_url(url)
        self.engine = _engine(self.url)
        self.retry_seconds = retry_seconds
        self.bulk_copy = True  # PostgreSQL with psycopg: COPY; False: executemany (benchmarks)

    def unavailable(self, error: sa.exc.DBAPIError) -> DatabaseUnavailable:
        reason = _reason(error)
        if not _is_transient(error):
            return DatabaseUnavailable(
                f"The results database {self.shown_url} cannot be written ({reason}); fix "
                "that (free disk space, say) and rerun the same command: it resumes where it "
                "stopped.")
        return DatabaseUnavailable(
            f"The results database {self.shown_url} stopped answering ({reason}) and did not "
            f"come back within {self.retry_seconds:g} s; rerun the same command once it is up: "
            "it resumes where it stopped.")

    @property
    def shown_url(self) -> str:
        return masked(self.url)

    @_retried
    def start_run(self, run_id: str, source: str, model: str, rows_total: int,
                  columns: Sequence[str] | None = None, delimiter: str | None = None,
                  started_at: datetime | None = None) -> None:
        """Open (or reopen) a run; rows past the end of a re-planned, shorter input go away.

        ``columns`` and ``delimiter`` describe the input file, so the scored CSV can be exported
        from the database alone. Stage timings of an earlier attempt are cleared.
        """
        with self.engine.begin() as conn:
            _lock_runs(conn, [run_id])
            conn.execute(similarity_scores.delete().where(
                similarity_scores.c.run_id == run_id,
                similarity_scores.c.row_number >= rows_total))
            conn.execute(stage_timings.delete().where(stage_timings.c.run_id == run_id))
            _upsert(conn, scoring_runs,
                    [_opened_run(run_id, source, model, rows_total, columns, delimiter,
                                 started_at)])

    @_retried
    def open_run_if_absent(self, run_id: str, source: str, model: str, rows_total: int,
                           columns: Sequence[str] | None = None,
                           delimiter: str | None = None) -> None:
        """Open the run as ``start_run`` would if it is not there yet; otherwise leave it, and
        its rows, alone. Nothing is deleted, so writers that each open the same run before
        writing to it (service replicas) cannot remove one another's rows."""
        with self.engine.begin() as conn:
            _upsert(conn, scoring_runs,
                    [_opened_run(run_id, source, model, rows_total, columns, delimiter)],
                    replace=False)

    @_retried
    def finish_run(self, run_id: str, status: str, unless_active_since: datetime | None = None,
                   failure: str | None = None) -> None:
        """Close the run, counting its rows from the table itself (the source of truth);
        ``failure`` is a failed run's one sentence (kept from an earlier record if None).

        ``unless_active_since``: close it only if it is still running and has shown no sign of
        life since then (a failure recorded while the database was away must not close a rerun
        that has started meanwhile).
        """
        counts = sa.select(
            sa.func.count().filter(similarity_scores.c.error.is_(None)),
            sa.func.count().filter(similarity_scores.c.error.is_not(None)),
        ).where(similarity_scores.c.run_id == run_id)
        now = _now()
        which = scoring_runs.c.run_id == run_id
        if unless_active_since is not None:
            which = sa.and_(which, scoring_runs.c.status == "running",
                            scoring_runs.c.updated_at <= unless_active_since)
        with self.engine.begin() as conn:
            ok, failed = conn.execute(counts).one()
            values = {"status": status, "finished_at": now, "updated_at": now, "rows_ok": ok,
                      "rows_error": failed}
            if status != "failed":
                values["failure"] = None
            elif failure is not None:
                values["failure"] = failure
            conn.execute(scoring_runs.update().where(which).values(**values))

    def upsert_scores(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Write one chunk's rows in a single transaction: all of them or none.

        Each row maps ``similarity_scores`` column names to values (``scored_at`` is set here;
        ``input_fields`` is the list of the row's input values, or absent). A row whose key is
        there already replaces it. The runs the rows belong to get their heartbeat bumped in the
        same transaction.
        """
        return self._write_scores(_in_key_order(rows))

    @_retried
    def _write_scores(self, ordered: list[Mapping[str, Any]]) -> int:
        """``upsert_scores`` on rows already listed (a retry must see them all again)."""
        if not ordered:
            return 0
        scored_at = _now()
        run_ids = sorted({row["run_id"] for row in ordered})
        with self.engine.begin() as conn:
            _lock_runs(conn, run_ids)
            if self.bulk_copy and conn.dialect.driver == "psycopg":
                _copy_replace(conn, ordered, scored_at)
            else:
                _upsert(conn, similarity_scores, [
                    dict(zip(SCORE_COLUMNS, _score_values(row, scored_at), strict=True))
                    for row in ordered])
            conn.execute(scoring_runs.update().where(scoring_runs.c.run_id.in_(run_ids))
                         .values(updated_at=scored_at))
        return len(ordered)

    def upsert_score_columns(self, run_id: str, model: str, rows: pa.Table, results: pa.Table
                             ) -> int:
        """``upsert_scores`` for one chunk held as columns: its rows (``plan.CHUNK_SCHEMA``,
        numbered in ascending order) and their results (``score.RESULT_SCHEMA``). On PostgreSQL
        the binary COPY stream is built from the columns; elsewhere the rows are listed."""
        if not (self.bulk_copy and self.engine.dialect.driver == "psycopg"):
            return self.upsert_scores(_column_rows(run_id, model, rows, results))
        return self._copy_columns(run_id, model, rows, results)

    @_retried
    def _copy_columns(self, run_id: str, model: str, rows: pa.Table, results: pa.Table) -> int:
        if rows.num_rows == 0:
            return 0
        scored_at = _now()
        data = binary_copy.copy_rows(_score_fields(run_id, model, rows, results, scored_at))
        numbers = rows["row"].to_numpy()
        if np.any(np.diff(numbers) != 1):
            raise ValueError("a chunk's rows are numbered in one ascending range")
        with self.engine.begin() as conn:
            _lock_runs(conn, [run_id])
            with conn.connection.driver_connection.cursor() as cursor:
                cursor.execute("DELETE FROM similarity_scores WHERE run_id = %s "
                               "AND row_number BETWEEN %s AND %s",
                               [run_id, int(numbers[0]), int(numbers[-1])])
                with cursor.copy(f"COPY similarity_scores ({', '.join(SCORE_COLUMNS)}) "
                                 "FROM STDIN (FORMAT BINARY)") as copy:
                    copy.write(binary_copy.SIGNATURE)
                    copy.write(data)
                    copy.write(binary_copy.TRAILER)
            conn.execute(scoring_runs.update().where(scoring_runs.c.run_id == run_id)
                         .values(updated_at=scored_at))
        return rows.num_rows

    @_retried
    def record_stage(self, run_id: str, stage: str, chunk: int, seconds: float) -> None:
        """Keep how long one stage took on one chunk (``RUN_LEVEL``: the whole run); heartbeat."""
        now = _now()
        with self.engine.begin() as conn:
            _upsert(conn, stage_timings, [{"run_id": run_id, "stage": stage, "chunk": chunk,
                                           "seconds": round(seconds, 3), "finished_at": now}])
            conn.execute(scoring_runs.update().where(scoring_runs.c.run_id == run_id)
                         .values(updated_at=now))

    @_retried
    def record_error_bound(self, run_id: str, pairs: int, largest: float, p99: float) -> None:
        """Keep a quantised run's measured ``|similarity - fp32|`` on its run record."""
        with self.engine.begin() as conn:
            conn.execute(scoring_runs.update().where(scoring_runs.c.run_id == run_id).values(
                error_bound_pairs=pairs, error_bound_max=largest, error_bound_p99=p99,
                updated_at=_now()))


@functools.lru_cache(maxsize=8)
def _engine(url: str) -> Engine:
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise UserError(f"SIM_PIPELINE_DATABASE_URL is not a database URL: {masked(url)}.") \
            from None
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        connect_args["timeout"] = SQLITE_BUSY_TIMEOUT_S
        if parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = sa.create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
        apply_schema(engine)
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
        raise UserError(f"Cannot use the results database {masked(parsed)}: {reason}.") from None
    except (ImportError, sa.exc.NoSuchModuleError) as error:
        raise UserError(f"No driver for the results database {masked(parsed)}: {error}.") \
            from None
    return engine
