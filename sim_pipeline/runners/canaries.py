"""Score the canary pairs (``SIM_PIPELINE_CANARY_CSV``) with a run's model and keep the scores.

Runs at finalize, through ``score_pairs``: the canaries' images are cached in the object store
after the first run, so each later run pays only for their inference. A canary file that cannot
be read costs a warning, never the run it would only have checked.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sim_pipeline.core.config import Settings
from sim_pipeline.core.errors import UserError
from sim_pipeline.results.canaries import CanaryScore, Scorer, record_canaries
from sim_pipeline.results.db import ResultsDB

log = logging.getLogger(__name__)


def canary_pairs(path: Path, settings: Settings) -> list[tuple[str, str]]:
    """The canary file's (URL, caption) pairs, its columns found as in any input."""
    from sim_pipeline.stages.plan import read_rows

    _, url_index, caption_index, rows = read_rows(
        path, settings.replace(url_column=None, caption_column=None))
    return [(row.fields[url_index] if url_index < len(row.fields) else "",
             row.fields[caption_index] if caption_index < len(row.fields) else "")
            for row in rows]


def score_canaries(run_id: str, settings: Settings, results: ResultsDB) -> int:
    """Score the canaries with ``settings``' model and record them under ``run_id``; how many
    were scored (0 without a canary file)."""
    if not settings.canary_csv:
        return 0
    from sim_pipeline.runners.api import score_pairs

    try:
        pairs = canary_pairs(Path(settings.canary_csv), settings)
    except UserError as error:
        log.warning("Canary pairs not scored: %s", error)
        return 0
    scored = [CanaryScore(s.row, s.url, s.caption, s.similarity, s.error)
              for s in score_pairs(pairs, settings)]
    scorer = Scorer(settings.model, settings.precision, settings.backend)
    return record_canaries(results, run_id, scorer, scored)
