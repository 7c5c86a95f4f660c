"""Canary pairs: a fixed CSV (``SIM_PIPELINE_CANARY_CSV``) scored with every run.

Its images stay cached in the object store, so scoring it again costs only inference. The data
cannot have changed, so a canary whose score moves by more than ``TOLERANCE`` between two runs
says the model, its precision, its backend or the preprocessing changed under the run. Each run's
canary scores are kept in ``canary_scores`` with what scored them; ``runners.canaries`` scores
them at finalize.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa

from sim_pipeline.results.db import ResultsDB, canary_scores

TOLERANCE = 1e-4  # similarities are rounded to 4 decimals: a move beyond that is real

c = canary_scores.c


@dataclass(frozen=True)
class CanaryScore:
    row_number: int
    image_url: str
    caption: str
    similarity: float | None
    error: str | None


@dataclass(frozen=True)
class Scorer:
    """What scored a run's canaries."""

    model: str
    precision: str
    backend: str

    def __str__(self) -> str:
        return f"model {self.model}, precision {self.precision}, backend {self.backend}"


@dataclass(frozen=True)
class CanaryVerdict:
    """How the run's canary scores compare with the reference run's."""

    compared: int           # canaries scored in both runs
    moved: int              # of them, scores that differ by more than TOLERANCE
    largest_move: float
    run_scorer: str | None
    against_scorer: str | None

    @property
    def changed(self) -> bool:
        return self.moved > 0

    def sentence(self) -> str:
        if not self.compared:
            return "no canary pair was scored in both runs"
        if not self.changed:
            return f"{self.compared} canaries unchanged (within {TOLERANCE:g})"
        return (f"model or preprocessing changed: {self.moved} of {self.compared} canaries moved "
                f"(up to {self.largest_move:.4f}); this run: {self.run_scorer}; reference: "
                f"{self.against_scorer}")


def record_canaries(db: ResultsDB, run_id: str, scorer: Scorer,
                    scored: Iterable[CanaryScore]) -> int:
    """Replace the run's canary scores; how many were written."""
    rows = [{"run_id": run_id, "row_number": s.row_number, "image_url": s.image_url,
             "caption": s.caption, "similarity": s.similarity, "error": s.error,
             "model": scorer.model, "model_precision": scorer.precision,
             "model_backend": scorer.backend} for s in scored]
    with db.engine.begin() as conn:
        conn.execute(canary_scores.delete().where(c.run_id == run_id))
        if rows:
            conn.execute(canary_scores.insert(), rows)
    return len(rows)


def _scores(db: ResultsDB, run_id: str) -> tuple[dict[tuple[str, str], float], str | None]:
    """The run's scored canaries by (URL, caption), and what scored them."""
    query = (sa.select(c.image_url, c.caption, c.similarity, c.model, c.model_precision,
                       c.model_backend).where(c.run_id == run_id, c.similarity.is_not(None))
             .order_by(c.row_number))
    found: dict[tuple[str, str], float] = {}
    scorer = None
    with db.engine.connect() as conn:
        for url, caption, similarity, model, precision, backend in conn.execute(query):
            found.setdefault((url, caption), similarity)
            scorer = scorer or str(Scorer(model, precision, backend))
    return found, scorer


def canary_verdict(db: ResultsDB, run_id: str, against_id: str) -> CanaryVerdict | None:
    """Compare the two runs' canary scores; None when neither run scored canaries."""
    run, run_scorer = _scores(db, run_id)
    against, against_scorer = _scores(db, against_id)
    if not run and not against:
        return None
    moves = [abs(run[key] - against[key]) for key in run.keys() & against.keys()]
    moved = [m for m in moves if m > TOLERANCE + 1e-9]  # float noise of 4-decimal values
    return CanaryVerdict(len(moves), len(moved), max(moved, default=0.0), run_scorer,
                         against_scorer)
