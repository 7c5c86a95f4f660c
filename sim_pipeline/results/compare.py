"""``results compare RUN_A RUN_B``: how far two runs (two models, two settings) agree.

Rows are matched by (``url_hash``, ``caption_hash``): the same image URL and the same caption,
whatever their row numbers; only rows with a similarity in both runs count, and a pair repeated
within a run counts once (its first row). The join, the rank percentiles and the rows that
disagree most are computed in SQL; Python holds only the two arrays of matched similarities.

Families score on different scales (a SigLIP similarity of 0.55 is not a CLIP 0.55), so rows are
compared by rank: a row's rank percentile is its mid-rank among the matched rows (ties share
their average rank) minus one half, over their count: in 0..1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa

from sim_pipeline.core.errors import UserError
from sim_pipeline.results.db import ResultsDB, similarity_scores
from sim_pipeline.results.query import get_run

scores = similarity_scores.c
DISAGREEMENTS = 10


@dataclass(frozen=True)
class Disagreement:
    """A matched row, its similarity and rank percentile in each run."""

    row_a: int
    row_b: int
    similarity_a: float
    similarity_b: float
    percentile_a: float
    percentile_b: float
    image_url: str
    caption: str


@dataclass(frozen=True)
class Kept:
    """Rows each run keeps at its threshold (similarity >= threshold), and both."""

    threshold_a: float
    threshold_b: float
    by_a: int
    by_b: int
    by_both: int
    by_neither: int


@dataclass(frozen=True)
class Comparison:
    common: int
    scored_a: int
    scored_b: int
    pearson: float | None       # None when a run gives every matched row the same score
    spearman: float | None
    top_percent: float
    top_rows: int               # rows in each run's top ``top_percent``
    top_both: int               # of them, rows in both tops
    kept: Kept | None
    disagreements: list[Disagreement]


def _pairs(run_id: str) -> sa.Subquery:
    """The run's scored (image, caption) pairs, once each."""
    return (sa.select(scores.url_hash, scores.caption_hash,
                      sa.func.min(scores.row_number).label("row"),
                      sa.func.max(scores.similarity).label("similarity"))
            .where(scores.run_id == run_id, scores.similarity.is_not(None))
            .group_by(scores.url_hash, scores.caption_hash).subquery())


def _matched(run_a: str, run_b: str) -> sa.Subquery:
    a, b = _pairs(run_a), _pairs(run_b)
    return (sa.select(a.c.row.label("row_a"), b.c.row.label("row_b"),
                      a.c.similarity.label("sa"), b.c.similarity.label("sb"))
            .join(b, sa.and_(a.c.url_hash == b.c.url_hash,
                             a.c.caption_hash == b.c.caption_hash)).subquery())


def _doubled_rank(column: sa.ColumnElement[float]) -> sa.ColumnElement[int]:
    """Twice the 1-based average rank, an exact integer: rank() is the lowest rank of a tie and
    count() over the same order (its frame ends after the tie's last row) the highest."""
    return sa.func.rank().over(order_by=column) + sa.func.count().over(order_by=column)


def percentile(doubled_rank: int, rows: int) -> float:
    """Mid-rank percentile in 0..1: (average rank - 0.5) / rows."""
    return (doubled_rank - 1) / (2.0 * rows)


def _scored_rows(db: ResultsDB, run_id: str) -> int:
    query = sa.select(sa.func.count()).where(scores.run_id == run_id,
                                             scores.similarity.is_not(None))
    with db.engine.connect() as conn:
        return conn.execute(query).scalar_one()


def matched_similarities(db: ResultsDB, run_a: str, run_b: str,
                         batch: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    """The two runs' similarities of their matched rows, in run A's row order, streamed."""
    matched = _matched(run_a, run_b)
    query = sa.select(matched.c.sa, matched.c.sb).order_by(matched.c.row_a)
    parts = []
    with db.engine.connect() as conn:
        result = conn.execution_options(yield_per=batch).execute(query)
        for partition in result.partitions():
            parts.append(np.array(partition, dtype=np.float64).reshape(-1, 2))
    both = np.concatenate(parts) if parts else np.empty((0, 2))
    return both[:, 0], both[:, 1]


def disagreements(db: ResultsDB, run_a: str, run_b: str, rows: int,
                  limit: int = DISAGREEMENTS) -> list[Disagreement]:
    """Up to ``limit`` matched rows whose rank percentiles differ, most first (``rows``: matched
    in all); equal gaps in run A's row order. Ranks are compared as exact integers, so ties stay
    ties and rows ranked alike in both runs are never listed."""
    matched = _matched(run_a, run_b)
    ranked = sa.select(matched, _doubled_rank(matched.c.sa).label("ra"),
                       _doubled_rank(matched.c.sb).label("rb")).subquery()
    gap = sa.func.abs(ranked.c.ra - ranked.c.rb)
    query = (sa.select(ranked.c.row_a, ranked.c.row_b, ranked.c.sa, ranked.c.sb, ranked.c.ra,
                       ranked.c.rb, scores.image_url, scores.caption)
             .join(similarity_scores, sa.and_(scores.run_id == run_a,
                                              scores.row_number == ranked.c.row_a))
             .where(gap > 0).order_by(gap.desc(), ranked.c.row_a).limit(limit))
    with db.engine.connect() as conn:
        return [Disagreement(row_a, row_b, sim_a, sim_b, percentile(ra, rows),
                             percentile(rb, rows), url, caption)
                for row_a, row_b, sim_a, sim_b, ra, rb, url, caption in conn.execute(query)]


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (as Spearman's rho needs)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    highest = np.cumsum(counts)
    return (highest - (counts - 1) / 2.0)[inverse]


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r; None when either side is constant (or fewer than two rows)."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rho: Pearson's r of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y)) if len(x) >= 2 else None


def top_overlap(x: np.ndarray, y: np.ndarray, percent: float) -> tuple[int, int]:
    """(rows in each top ``percent``, rows in both). Within a tie at the cut, earlier rows
    (run A's row order) go first."""
    size = max(1, math.ceil(len(x) * percent / 100.0))
    top_x = np.argsort(-x, kind="stable")[:size]
    top_y = np.argsort(-y, kind="stable")[:size]
    return size, len(np.intersect1d(top_x, top_y))


def kept_at(x: np.ndarray, y: np.ndarray, threshold_a: float, threshold_b: float) -> Kept:
    keep_x, keep_y = x >= threshold_a, y >= threshold_b
    return Kept(threshold_a, threshold_b, int(keep_x.sum()), int(keep_y.sum()),
                int((keep_x & keep_y).sum()), int((~keep_x & ~keep_y).sum()))


def compare_runs(db: ResultsDB, run_a: str, run_b: str, top_percent: float = 10.0,
                 thresholds: tuple[float, float] | None = None) -> Comparison:
    """Everything ``results compare`` prints; ``UserError`` for an unknown run or no common row."""
    for run_id in (run_a, run_b):
        get_run(db, run_id)
    x, y = matched_similarities(db, run_a, run_b)
    if len(x) == 0:
        raise UserError(f"Runs {run_a!r} and {run_b!r} have no scored row in common (rows are "
                        "matched by image URL and caption).")
    size, both = top_overlap(x, y, top_percent)
    return Comparison(
        common=len(x), scored_a=_scored_rows(db, run_a), scored_b=_scored_rows(db, run_b),
        pearson=pearson(x, y), spearman=spearman(x, y), top_percent=top_percent,
        top_rows=size, top_both=both,
        kept=kept_at(x, y, *thresholds) if thresholds else None,
        disagreements=disagreements(db, run_a, run_b, len(x)))
