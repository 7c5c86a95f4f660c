"""``results drift RUN [--against RUN]``: did today's scores move, and why.

A run's scored rows are compared with a reference run's (``against``: by default the previous
succeeded run of the same input name, else ``SIM_PIPELINE_DRIFT_REFERENCE``):

- PSI, the population stability index, over 10 bins cut at the reference's deciles (deciles that
  tie merge their bins); an empty bin counts as a share of ``EMPTY_BIN``, so one bin cannot make
  the index infinite;
- the two-sample Kolmogorov-Smirnov statistic and p-value (``scipy.stats.ks_2samp``'s, computed
  from the runs' score counts: exact up to 10,000 rows a run, Smirnov's asymptotic form above);
- the Wasserstein distance (``scipy.stats.wasserstein_distance``) over the reference's standard
  deviation, so a move reads in units of the reference's spread;
- the share of scores above ``drift_cutoff`` in each run, and each error code's share of all rows;
- the canary verdict (``results.canaries``): a canary pair whose score moved means the model or
  its preprocessing changed under the run.

Scores have four decimals, so both runs are read as counts per 0.0001 (at most 10,001 numbers a
run, whatever its size): memory stays flat as runs grow. Each comparison is kept in the
``score_drift`` table, keyed by (run, against); its verdict is ``stable``, ``watch`` or ``alert``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import sqlalchemy as sa

from sim_pipeline.core.config import Settings
from sim_pipeline.core.errors import UserError
from sim_pipeline.results.canaries import CanaryVerdict, canary_verdict
from sim_pipeline.results.db import ResultsDB, _upsert, score_drift, scoring_runs
from sim_pipeline.results.query import RunInfo, error_counts, get_run, similarity_counts

UNIT = 10_000                # similarities have 4 decimals: counts are kept per 0.0001
EMPTY_BIN = 1e-4             # the share an empty PSI bin counts as
EXACT_KS_ROWS = 10_000       # ks_2samp is exact up to this many rows a run (scipy's own 'auto')
QUANTILES = {"p1": 0.01, "p5": 0.05, "p50": 0.5, "p95": 0.95, "p99": 0.99}
STABLE, WATCH, ALERT = "stable", "watch", "alert"
EXIT_ALERT = 3

@dataclass(frozen=True)
class Thresholds:
    """When a figure means watch or alert (``SIM_PIPELINE_DRIFT_*``)."""

    cutoff: float = 0.6
    psi_watch: float = 0.1
    psi_alert: float = 0.25
    wasserstein_alert: float = 0.1
    error_points_alert: float = 5.0

    @classmethod
    def of(cls, settings: Settings) -> Thresholds:
        return cls(settings.drift_cutoff, settings.drift_psi_watch, settings.drift_psi_alert,
                   settings.drift_wasserstein_alert, settings.drift_error_points_alert)


@dataclass(frozen=True)
class Scores:
    """A run's score distribution: each distinct similarity and how many rows have it."""

    values: np.ndarray
    counts: np.ndarray

    @classmethod
    def of(cls, counts: Counter[int]) -> Scores:
        units = np.array(sorted(counts), dtype=np.int64)
        return cls(units / UNIT, np.array([counts[u] for u in units], dtype=np.int64))

    @property
    def rows(self) -> int:
        return int(self.counts.sum())

    def quantile(self, q: float) -> float:
        """Nearest rank, as the report's: the smallest score with at least ``q`` of rows at or
        below it."""
        cumulative = np.cumsum(self.counts)
        return float(self.values[min(np.searchsorted(cumulative, q * self.rows), len(self.values)
                                     - 1)])

    def std(self) -> float:
        mean = np.average(self.values, weights=self.counts)
        return float(np.sqrt(np.average((self.values - mean) ** 2, weights=self.counts)))

    def share_above(self, cutoff: float) -> float:
        return float(self.counts[self.values > cutoff].sum() / self.rows)

    def repeated(self) -> np.ndarray:
        """Every row's score (small runs only: what ``ks_2samp`` takes)."""
        return np.repeat(self.values, self.counts)

    def same_as(self, other: Scores) -> bool:
        """The very same distribution (a rerun that reproduced its reference): the tests'
        answers are then known, D 0, p 1, distance 0, and scipy (0.5 s to import) stays out."""
        return np.array_equal(self.values, other.values) and \
            np.array_equal(self.counts, other.counts)


def psi(reference: Scores, current: Scores, bins: int = 10) -> float:
    """Population stability index of ``current`` against ``reference``, bins cut at the
    reference's deciles."""
    edges = np.unique([reference.quantile(i / bins) for i in range(1, bins)])

    def shares(scores: Scores) -> np.ndarray:
        per_bin = np.bincount(np.searchsorted(edges, scores.values, side="left"),
                              weights=scores.counts, minlength=len(edges) + 1)
        return np.maximum(per_bin / scores.rows, EMPTY_BIN)

    expected, actual = shares(reference), shares(current)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def ks_test(reference: Scores, current: Scores) -> tuple[float, float]:
    """``scipy.stats.ks_2samp`` (two-sided) of the two runs' scores: (D, p-value)."""
    if reference.same_as(current):
        return 0.0, 1.0
    from scipy import stats

    if max(reference.rows, current.rows) <= EXACT_KS_ROWS:
        found = stats.ks_2samp(reference.repeated(), current.repeated())
        return float(found.statistic), float(found.pvalue)
    grid = np.union1d(reference.values, current.values)

    def cdf(scores: Scores) -> np.ndarray:
        below = np.searchsorted(scores.values, grid, side="right")
        return np.concatenate([[0], np.cumsum(scores.counts)])[below] / scores.rows

    d = float(np.max(np.abs(cdf(reference) - cdf(current))))
    m, n = sorted([float(reference.rows), float(current.rows)], reverse=True)
    return d, float(np.clip(stats.kstwo.sf(d, np.round(m * n / (m + n))), 0, 1))


def normalised_wasserstein(reference: Scores, current: Scores) -> float | None:
    """Wasserstein distance over the reference's standard deviation; None when the reference
    gives every row the same score (no spread to measure by)."""
    spread = reference.std()
    if spread == 0:
        return None
    if reference.same_as(current):
        return 0.0
    from scipy import stats

    return float(stats.wasserstein_distance(reference.values, current.values,
                                            reference.counts, current.counts)) / spread


@dataclass(frozen=True)
class Drift:
    """One comparison: ``run_id``'s scores against ``against_run_id``'s."""

    run_id: str
    against_run_id: str
    verdict: str
    reasons: list[str]
    scored_rows: int
    against_scored_rows: int
    psi: float | None
    ks_statistic: float | None
    ks_pvalue: float | None
    wasserstein: float | None
    cutoff: float
    share_above: float | None
    against_share_above: float | None
    error_shares: dict[str, tuple[float, float]]     # code: (share in run, share in against)
    canaries: CanaryVerdict | None
    thresholds: Thresholds = field(default_factory=Thresholds)
    histogram: dict[str, list[float]] = field(default_factory=dict, repr=False)

    @property
    def exit_status(self) -> int:
        return EXIT_ALERT if self.verdict == ALERT else 0

    def headline(self) -> str:
        """The verdict in one line, the first a reader sees."""
        if self.verdict == STABLE:
            why = "scores and error shares as in the reference"
            if self.canaries is not None and self.canaries.compared:
                why += "; canaries unchanged"
        else:
            why = "; ".join(self.reasons)
        return f"{self.verdict.upper()}: run {self.run_id} against {self.against_run_id}: {why}"

    def to_json(self) -> dict[str, Any]:
        found = asdict(self)
        found.pop("histogram")
        found["error_shares"] = {code: list(pair) for code, pair in self.error_shares.items()}
        found["exit_status"] = self.exit_status
        return found


def shown(value: float | None, digits: int = 4) -> str:
    """A figure as printed and reported: fixed decimals, '-' when undefined."""
    return "-" if value is None else f"{value:.{digits}f}"


def shown_pvalue(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def error_shares(db: ResultsDB, run: RunInfo, scored: int) -> dict[str, float]:
    """Each error code's share of all the run's rows (scored ones included)."""
    codes = error_counts(db, run.run_id)
    rows = scored + sum(n for _, n in codes)
    return {code: n / rows for code, n in codes}


def _reasons(found: dict[str, Any], limits: Thresholds, canaries: CanaryVerdict | None,
             shares: dict[str, tuple[float, float]]) -> tuple[str, list[str]]:
    alerts, watches = [], []
    if found["psi"] is not None and found["psi"] >= limits.psi_alert:
        alerts.append(f"PSI {found['psi']:.3f} >= {limits.psi_alert:g}")
    elif found["psi"] is not None and found["psi"] >= limits.psi_watch:
        watches.append(f"PSI {found['psi']:.3f} >= {limits.psi_watch:g}")
    if found["wasserstein"] is not None and found["wasserstein"] >= limits.wasserstein_alert:
        alerts.append(f"Wasserstein {found['wasserstein']:.3f} std >= "
                      f"{limits.wasserstein_alert:g}")
    for code, (now, before) in shares.items():
        points = round(100 * (now - before), 9)  # 1/20 of rows is 5 points, not 4.999...
        if points >= limits.error_points_alert:
            alerts.append(f"{code} {100 * before:.1f}% -> {100 * now:.1f}% of rows "
                          f"(+{points:.1f} points)")
    if canaries is not None and canaries.changed:
        alerts.append(canaries.sentence())
    if found["scored"] == 0 and found["against_scored"] > 0:
        alerts.append("no row was scored")
    verdict = ALERT if alerts else WATCH if watches else STABLE
    return verdict, alerts + watches


def measure_drift(db: ResultsDB, run_id: str, against_id: str,
                  limits: Thresholds = Thresholds()) -> Drift:
    """Compare the two runs' scored rows, error shares and canaries (nothing is written)."""
    run, against = get_run(db, run_id), get_run(db, against_id)
    current = Scores.of(similarity_counts(db, run.run_id))
    reference = Scores.of(similarity_counts(db, against.run_id))
    both = current.rows > 0 and reference.rows > 0
    d, p = ks_test(reference, current) if both else (None, None)
    found = {"psi": psi(reference, current) if both else None,
             "wasserstein": normalised_wasserstein(reference, current) if both else None,
             "scored": current.rows, "against_scored": reference.rows}
    now_shares = error_shares(db, run, current.rows)
    before_shares = error_shares(db, against, reference.rows)
    shares = {code: (now_shares.get(code, 0.0), before_shares.get(code, 0.0))
              for code in sorted(set(now_shares) | set(before_shares))}
    canaries = canary_verdict(db, run.run_id, against.run_id)
    verdict, reasons = _reasons(found, limits, canaries, shares)
    return Drift(
        run_id=run.run_id, against_run_id=against.run_id, verdict=verdict, reasons=reasons,
        scored_rows=current.rows, against_scored_rows=reference.rows, psi=found["psi"],
        ks_statistic=d, ks_pvalue=p, wasserstein=found["wasserstein"], cutoff=limits.cutoff,
        share_above=current.share_above(limits.cutoff) if current.rows else None,
        against_share_above=reference.share_above(limits.cutoff) if reference.rows else None,
        error_shares=shares, canaries=canaries, thresholds=limits,
        histogram=overlaid_histograms(current, reference))


def overlaid_histograms(current: Scores, reference: Scores, bins: int = 40
                        ) -> dict[str, list[float]]:
    """Both runs' rows per bin over the range of their scores together (the report draws them
    on one chart): ``edges`` and the counts of ``run`` and ``against``."""
    seen = [s.values for s in (current, reference) if s.rows]
    if not seen:
        return {}
    low, high = float(min(v[0] for v in seen)), float(max(v[-1] for v in seen))
    edges = np.linspace(low, max(high, low + 1.0 / UNIT), bins + 1)
    counted = {name: np.histogram(s.values, edges, weights=s.counts)[0]
               for name, s in (("run", current), ("against", reference))}
    return {"edges": [round(float(e), 6) for e in edges],
            **{name: [int(n) for n in found] for name, found in counted.items()}}


def record_drift(db: ResultsDB, drift: Drift) -> None:
    """Keep the comparison in ``score_drift`` (a comparison made again replaces it)."""
    row = {"run_id": drift.run_id, "against_run_id": drift.against_run_id,
           "verdict": drift.verdict, "reasons": json.dumps(drift.reasons),
           "psi": drift.psi, "ks_statistic": drift.ks_statistic, "ks_pvalue": drift.ks_pvalue,
           "wasserstein": drift.wasserstein, "cutoff": drift.cutoff,
           "share_above": drift.share_above, "against_share_above": drift.against_share_above,
           "scored_rows": drift.scored_rows, "against_scored_rows": drift.against_scored_rows,
           "error_shares": json.dumps(drift.to_json()["error_shares"], sort_keys=True),
           "canaries": None if drift.canaries is None else json.dumps(asdict(drift.canaries)),
           "computed_at": datetime.now(UTC)}
    with db.engine.begin() as conn:
        _upsert(conn, score_drift, [row])


def recorded_verdict(db: ResultsDB, run_id: str, against_id: str) -> str | None:
    query = sa.select(score_drift.c.verdict).where(score_drift.c.run_id == run_id,
                                                   score_drift.c.against_run_id == against_id)
    with db.engine.connect() as conn:
        return conn.execute(query).scalar_one_or_none()


DATE = re.compile(r"\d{4}-?\d{2}-?\d{2}")


def input_name(source: str) -> str:
    """What makes two runs runs of the same input: the file name, any date in it made generic
    (``incoming/2025-02-01.csv`` and ``.../2025-02-02.csv`` are the same nightly input)."""
    return DATE.sub("{date}", PurePosixPath(source.replace("\\", "/")).name)


def _earlier_succeeded(db: ResultsDB, run: RunInfo) -> Iterator[Any]:
    runs = scoring_runs.c
    query = (sa.select(runs.run_id, runs.source)
             .where(runs.status == "succeeded", runs.run_id != run.run_id,
                    runs.started_at < run.started_at)
             .order_by(runs.started_at.desc(), runs.run_id.desc()))
    with db.engine.connect() as conn:
        yield from conn.execution_options(yield_per=500).execute(query)


def default_against(db: ResultsDB, run_id: str, reference: str = "") -> str | None:
    """The previous succeeded run of the same input name, else the pinned ``reference`` (if it is
    not the run itself); None when neither exists."""
    run = get_run(db, run_id)
    name = input_name(run.source)
    for earlier in _earlier_succeeded(db, run):
        if input_name(earlier.source) == name:
            return str(earlier.run_id)
    return reference if reference and reference != run_id else None


def drift_of_run(db: ResultsDB, run_id: str, settings: Settings,
                 against: str | None = None) -> Drift:
    """Measure and record the run's drift against ``against`` or the default reference;
    ``UserError`` when there is nothing to compare with."""
    against = against or default_against(db, run_id, settings.drift_reference)
    if against is None:
        raise UserError(f"Run {run_id!r} has no earlier succeeded run of the same input and no "
                        "pinned reference; pass --against RUN or set "
                        "SIM_PIPELINE_DRIFT_REFERENCE.")
    drift = measure_drift(db, run_id, against, Thresholds.of(settings))
    record_drift(db, drift)
    return drift


def run_summary(db: ResultsDB, run_id: str) -> dict[str, Any]:
    """What a downstream consumer (the Asset event) needs of a finished run, JSON-ready."""
    run = get_run(db, run_id)
    scores = Scores.of(similarity_counts(db, run_id))
    rows = (run.rows_ok or 0) + (run.rows_error or 0)
    return {"run_id": run.run_id, "rows": rows, "scored": scores.rows, "model": run.model,
            "error_shares": error_shares(db, run, scores.rows),
            "quantiles": {name: scores.quantile(q) for name, q in QUANTILES.items()}
            if scores.rows else {}}
