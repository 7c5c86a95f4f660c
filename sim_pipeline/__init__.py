"""sim-pipeline: score how well captions describe images (CLIP), chunked and idempotent.

The core library has no Airflow import: the same stage functions run from the CLI, from
``score_pairs`` and from the Airflow DAG in ``dags/``. Names are imported lazily, so worker
processes and fully cached runs load only what they use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "score_pairs": "sim_pipeline.runners.api",
    "Settings": "sim_pipeline.core.config",
    "load_settings": "sim_pipeline.core.config",
    "UserError": "sim_pipeline.core.errors",
    "score_csv": "sim_pipeline.runners.pipeline",
    "ScoredRow": "sim_pipeline.stages.score",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sim_pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
