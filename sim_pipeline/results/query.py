"""What people read back from the results table: runs, a run's rows, the latest scores, pruning.

Every query is built with SQLAlchemy Core, so every value is a bound parameter. Times come back
timezone-aware (UTC); SQLite, which stores them naive, is read as UTC.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from sim_pipeline.core import errors
from sim_pipeline.core.errors import UserError
from sim_pipeline.core.layout import STAGES
from sim_pipeline.results.db import (
    RUN_LEVEL,
    ResultsDB,
    canary_scores,
    latest_similarity_scores,
    score_drift,
    scoring_runs,
    similarity_scores,
    stage_timings,
)

DEFAULT_STALE_AFTER = timedelta(minutes=30)
scores, runs = similarity_scores.c, scoring_runs.c


def utc(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def now_utc() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class RunInfo:
    """One row of ``scoring_runs``; a running run's counts are live from ``similarity_scores``."""

    run_id: str
    source: str
    model: str
    started_at: datetime
    finished_at: datetime | None
    updated_at: datetime | None
    status: str
    rows_total: int | None
    rows_ok: int | None
    rows_error: int | None
    input_columns: list[str] | None
    input_delimiter: str | None
    failure: str | None = None  # a failed run's one sentence

    @property
    def last_activity(self) -> datetime:
        return self.finished_at or self.updated_at or self.started_at

    def state(self, now: datetime, stale_after: timedelta = DEFAULT_STALE_AFTER) -> str:
        """``running`` turns ``stale`` when no chunk or stage has reported for ``stale_after``."""
        if self.status == "running" and now - self.last_activity > stale_after:
            return "stale"
        return self.status

    def duration(self, now: datetime, stale_after: timedelta = DEFAULT_STALE_AFTER) -> timedelta:
        """Start to finish; a live run: so far; a stale one: to its last sign of life."""
        if self.state(now, stale_after) == "running":
            return now - self.started_at
        return self.last_activity - self.started_at

    @property
    def scored_share(self) -> float | None:
        done = (self.rows_ok or 0) + (self.rows_error or 0)
        return (self.rows_ok or 0) / done if done else None


def _run_info(row: Any) -> RunInfo:
    return RunInfo(row.run_id, row.source, row.model, utc(row.started_at), utc(row.finished_at),
                   utc(row.updated_at), row.status, row.rows_total, row.rows_ok, row.rows_error,
                   json.loads(row.input_columns) if row.input_columns else None,
                   row.input_delimiter, row.failure)


def _with_live_counts(conn: Connection, found: list[RunInfo]) -> list[RunInfo]:
    running = [r.run_id for r in found if r.status == "running"]
    if not running:
        return found
    counts = {row.run_id: (row.ok, row.failed) for row in conn.execute(
        sa.select(scores.run_id,
                  sa.func.count().filter(scores.error.is_(None)).label("ok"),
                  sa.func.count().filter(scores.error.is_not(None)).label("failed"))
        .where(scores.run_id.in_(running)).group_by(scores.run_id))}
    return [replace(r, rows_ok=counts.get(r.run_id, (0, 0))[0],
                    rows_error=counts.get(r.run_id, (0, 0))[1])
            if r.status == "running" else r for r in found]


def list_runs(db: ResultsDB, limit: int = 20) -> list[RunInfo]:
    """The newest runs first."""
    query = sa.select(scoring_runs).order_by(runs.started_at.desc(), runs.run_id).limit(limit)
    with db.engine.connect() as conn:
        return _with_live_counts(conn, [_run_info(r) for r in conn.execute(query)])


def get_run(db: ResultsDB, run_id: str) -> RunInfo:
    with db.engine.connect() as conn:
        row = conn.execute(sa.select(scoring_runs).where(runs.run_id == run_id)).one_or_none()
        if row is None:
            raise UserError(f"Run {run_id!r} is not in the results database {db.shown_url}; "
                            "`sim-pipeline results runs` lists the runs it holds.")
        return _with_live_counts(conn, [_run_info(row)])[0]


@dataclass(frozen=True)
class ScoreRow:
    row_number: int
    similarity: float | None
    error: str | None
    image_url: str
    caption: str


def run_rows(db: ResultsDB, run_id: str, errors_only: bool = False,
             limit: int = 20) -> list[ScoreRow]:
    """The first ``limit`` rows of a run in input order (only failed ones if asked)."""
    where = [scores.run_id == run_id]
    if errors_only:
        where.append(scores.error.is_not(None))
    query = (sa.select(scores.row_number, scores.similarity, scores.error, scores.image_url,
                       scores.caption).where(*where).order_by(scores.row_number).limit(limit))
    with db.engine.connect() as conn:
        return [ScoreRow(*row) for row in conn.execute(query)]


def error_counts(db: ResultsDB, run_id: str) -> list[tuple[str, int]]:
    """(code, rows) for each error code of the run, most frequent first."""
    count = sa.func.count().label("n")
    query = (sa.select(scores.error, count)
             .where(scores.run_id == run_id, scores.error.is_not(None))
             .group_by(scores.error).order_by(count.desc(), scores.error))
    with db.engine.connect() as conn:
        return [(code, n) for code, n in conn.execute(query)]


def similarity_counts(db: ResultsDB, run_id: str) -> Counter[int]:
    """The run's exact score distribution: rows per similarity in units of 0.0001.

    Similarities have four decimals, so this is at most 10,001 groups however large the run.
    """
    unit = sa.cast(sa.func.round(scores.similarity * 10000), sa.Integer).label("unit")
    query = (sa.select(unit, sa.func.count())
             .where(scores.run_id == run_id, scores.similarity.is_not(None)).group_by(unit))
    with db.engine.connect() as conn:
        return Counter({int(u): n for u, n in conn.execute(query)})


@dataclass(frozen=True)
class StageTime:
    stage: str
    chunks: int         # 0 for stages that run once per run
    seconds: float      # summed over chunks
    slowest: float      # the slowest chunk


def stage_times(db: ResultsDB, run_id: str) -> list[StageTime]:
    """Time spent per stage, in pipeline order (the latest attempt of each chunk)."""
    t = stage_timings.c
    query = (sa.select(t.stage, sa.func.count().filter(t.chunk != RUN_LEVEL),
                       sa.func.sum(t.seconds), sa.func.max(t.seconds))
             .where(t.run_id == run_id).group_by(t.stage))
    with db.engine.connect() as conn:
        found = [StageTime(s, n, float(total), float(slowest))
                 for s, n, total, slowest in conn.execute(query)]
    order = {name: i for i, name in enumerate(STAGES)}
    return sorted(found, key=lambda s: (order.get(s.stage, len(order)), s.stage))


def fetched_urls(db: ResultsDB, run_id: str, limit: int) -> list[tuple[str, str]]:
    """Up to ``limit`` distinct (url_hash, url) of the run whose image was asked for.

    Ordered by hash, so a capped list is an even sample of the run's URLs.
    """
    not_fetched = [code for code in errors.CODES if errors.is_input_error(code)]
    query = (sa.select(scores.url_hash, sa.func.min(scores.image_url))
             .where(scores.run_id == run_id, scores.url_hash.is_not(None),
                    sa.or_(scores.error.is_(None), scores.error.not_in(not_fetched)))
             .group_by(scores.url_hash).order_by(scores.url_hash).limit(limit))
    with db.engine.connect() as conn:
        return [(h, u) for h, u in conn.execute(query)]


@dataclass(frozen=True)
class LatestScore:
    similarity: float | None
    error: str | None
    model: str
    run_id: str
    scored_at: datetime
    image_url: str
    caption: str


def latest_scores(db: ResultsDB, url_hash: str | None = None, caption_hash: str | None = None,
                  model: str | None = None, limit: int = 20) -> list[LatestScore]:
    """The newest result per (image, caption, model) for one image URL or one caption, best
    score first (failed rows last)."""
    v = latest_similarity_scores.c
    where = []
    if url_hash is not None:
        where.append(v.url_hash == url_hash)
    if caption_hash is not None:
        where.append(v.caption_hash == caption_hash)
    if model is not None:
        where.append(v.model == model)
    query = (sa.select(v.similarity, v.error, v.model, v.run_id, v.scored_at, v.image_url,
                       v.caption).where(*where)
             .order_by(v.similarity.is_(None), v.similarity.desc(), v.scored_at.desc())
             .limit(limit))
    with db.engine.connect() as conn:
        return [LatestScore(s, e, m, r, utc(at), u, c) for s, e, m, r, at, u, c in
                conn.execute(query)]


@dataclass(frozen=True)
class ExportRow:
    row_number: int
    input_fields: list[str] | None
    image_url: str
    caption: str
    similarity: float | None
    error: str | None


def rows_without_fields(db: ResultsDB, run_id: str) -> int:
    """Rows written before the database kept input values (schema 002)."""
    query = (sa.select(sa.func.count()).select_from(similarity_scores)
             .where(scores.run_id == run_id, scores.input_fields.is_(None)))
    with db.engine.connect() as conn:
        return conn.execute(query).scalar_one()


def export_rows(db: ResultsDB, run_id: str, batch: int = 5000) -> Iterator[ExportRow]:
    """Every row of the run in input order, streamed (server-side cursor on PostgreSQL)."""
    query = (sa.select(scores.row_number, scores.input_fields, scores.image_url, scores.caption,
                       scores.similarity, scores.error)
             .where(scores.run_id == run_id).order_by(scores.row_number))
    with db.engine.connect() as conn:
        for number, fields, url, caption, similarity, error in conn.execution_options(
                yield_per=batch).execute(query):
            yield ExportRow(number, json.loads(fields) if fields is not None else None, url,
                            caption, similarity, error)


def prunable_runs(db: ResultsDB, older_than: timedelta,
                  now: datetime | None = None) -> list[tuple[RunInfo, int]]:
    """Runs whose last sign of life is older than ``older_than``, with their row counts."""
    cutoff = (now or now_utc()) - older_than
    last = sa.func.coalesce(runs.finished_at, runs.updated_at, runs.started_at)
    with db.engine.connect() as conn:
        found = [_run_info(r) for r in conn.execute(
            sa.select(scoring_runs).where(last < cutoff).order_by(last, runs.run_id))]
        ids = [r.run_id for r in found]
        counts = {run_id: n for run_id, n in conn.execute(
            sa.select(scores.run_id, sa.func.count()).where(scores.run_id.in_(ids))
            .group_by(scores.run_id))} if ids else {}
    return [(r, counts.get(r.run_id, 0)) for r in found]


def delete_runs(db: ResultsDB, run_ids: Sequence[str]) -> int:
    """Delete runs with their rows, timings, canaries and drift comparisons, one transaction per
    run; returns rows deleted."""
    deleted = 0
    for run_id in run_ids:
        with db.engine.begin() as conn:
            deleted += conn.execute(similarity_scores.delete()
                                    .where(scores.run_id == run_id)).rowcount
            conn.execute(stage_timings.delete().where(stage_timings.c.run_id == run_id))
            conn.execute(canary_scores.delete().where(canary_scores.c.run_id == run_id))
            conn.execute(score_drift.delete().where(score_drift.c.run_id == run_id))
            conn.execute(scoring_runs.delete().where(runs.run_id == run_id))
    return deleted
