"""``score_pairs``: the pipeline's stages as a streaming Python API, no files needed.

Pairs are taken in small groups; each group becomes a content-addressed chunk in the store, so
images are cached across calls and a repeated group costs no inference. Results come back in order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from itertools import count
from typing import Any

from sim_pipeline.core.config import Settings, load_settings
from sim_pipeline.core.layout import sha256_hex
from sim_pipeline.core.streams import batched
from sim_pipeline.runners.lifecycle import Run, check_model_folder
from sim_pipeline.stages.plan import InputRow, normalise_row, write_chunks
from sim_pipeline.stages.registry import CHUNK_STAGES
from sim_pipeline.stages.score import ScoredRow

Pair = tuple[str, str] | Mapping[str, Any]


def _as_row(number: int, pair: Pair) -> InputRow:
    if isinstance(pair, Mapping):
        url, caption = pair.get("url"), pair.get("caption")
    else:
        url, caption = pair
    url, caption = ("" if url is None else str(url)), ("" if caption is None else str(caption))
    return normalise_row(number, url, caption, [url, caption])


def score_pairs(pairs: Iterable[Pair], settings: Settings | None = None,
                group_size: int = 256) -> Iterator[ScoredRow]:
    """Yield one ``ScoredRow`` per (url, caption) pair, in order, with a similarity or an error."""
    settings = settings or load_settings()
    if not settings.inference_url:  # else the service holds the model
        check_model_folder(settings.model)  # at once, not after the first group's fetch
    run = Run.open(settings, record=False)
    numbers = count()
    for group in batched(pairs, group_size):
        rows = [_as_row(next(numbers), pair) for pair in group]
        content = json.dumps([[r.row, r.url, r.caption] for r in rows], ensure_ascii=False)
        digest = sha256_hex(content)[:16]
        (chunk,) = write_chunks(run.store, "api", digest, rows, len(rows))
        for stage in CHUNK_STAGES:
            scored = run.run_stage(stage, chunk)
        yield from scored

