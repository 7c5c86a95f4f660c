"""sim-pipeline: score how well captions describe images (CLIP), chunked and idempotent.

The core library has no Airflow import: the same stage functions run from the CLI, from
``score_pairs`` and from the Airflow DAG in ``dags/``.
"""

from sim_pipeline.api import score_pairs
from sim_pipeline.config import Settings, load_settings
from sim_pipeline.errors import UserError
from sim_pipeline.pipeline import score_csv
from sim_pipeline.score import ScoredRow

__all__ = ["ScoredRow", "Settings", "UserError", "load_settings", "score_csv", "score_pairs"]
__version__ = "0.1.0"
