"""Where each stage's inputs and outputs live in the object store.

All keys are deterministic functions of the run, the chunk and the model, which is what makes every
stage idempotent: a stage whose output key exists has already done its work.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from typing import Any

# The stages' names, in pipeline order, as the CLI, the runners, the results table, the report
# and the DAG use them; what each per-chunk stage runs and needs is ``stages.registry``'s.
PLAN, FETCH_IMAGES, EMBED_IMAGES, EMBED_TEXTS, JOIN_SCORE, FINALIZE = STAGES = (
    "plan", "fetch-images", "embed-images", "embed-texts", "join-score", "finalize")


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def caption_hash(caption: str) -> str:
    """What keys a caption's vector: its exact text."""
    return sha256_hex(caption)


def image_key(url_hash: str) -> str:
    return f"images/{url_hash[:2]}/{url_hash}"


def image_meta_key(url_hash: str) -> str:
    return f"{image_key(url_hash)}.json"


# Fetch leases: a run downloading a URL holds its lease, so a concurrent run waits for the result
# instead of downloading it too (``stages/fetch/leases.py``).
LEASES_PREFIX = "leases"


def image_lease_key(url_hash: str) -> str:
    return f"{LEASES_PREFIX}/images/{url_hash[:2]}/{url_hash}"


def plan_prefix(run_id: str, input_digest: str) -> str:
    """A run's plan lives under its input's digest: a changed input never meets stale chunks."""
    return f"runs/{run_id}/{input_digest}"


def manifest_key(run_id: str, input_digest: str) -> str:
    return f"{plan_prefix(run_id, input_digest)}/manifest.json"


def model_check_key(run_id: str, model: str, backend: str) -> str:
    """Marks that the run's model resolved (config and processor) for this backend, so a rerun
    skips the check and a fully cached rerun never imports transformers."""
    return f"runs/{run_id}/model-checks/{sha256_hex(f'{model}|{backend}')[:16]}.json"


# Runs that failed while the results database was away, marked failed once it answers again.
PENDING_FAILURES_KEY = "state/pending-failures.json"


def current_plan_key(run_id: str) -> str:
    """Points at the run's newest plan, for runners that know only the run id."""
    return f"runs/{run_id}/current.json"


def model_tag(model: str, variant: str) -> str:
    """A short, path-safe name for (model, precision or backend): embeddings differ by both."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model.rstrip("/").split("/")[-1])[:40]
    return f"{slug}-{sha256_hex(model)[:8]}-{variant}"


@dataclass(frozen=True)
class ChunkRef:
    """A small descriptor of one chunk; safe to pass through Airflow XCom."""

    run_id: str
    input_digest: str
    index: int
    first_row: int
    rows: int
    sha256: str | None = None  # of the chunk's rows.arrow: verified whenever it is read

    @property
    def prefix(self) -> str:
        return f"{plan_prefix(self.run_id, self.input_digest)}/chunks/{self.index:05d}"

    @property
    def rows_key(self) -> str:
        return f"{self.prefix}/rows.arrow"

    @property
    def fetch_key(self) -> str:
        return f"{self.prefix}/fetch.json"

    def image_embeddings_key(self, tag: str) -> str:
        return f"{self.prefix}/image-embeddings.{tag}"

    def text_embeddings_key(self, tag: str) -> str:
        return f"{self.prefix}/text-embeddings.{tag}"

    def results_key(self, tag: str) -> str:
        return f"{self.prefix}/results.{tag}.arrow"

    def results_meta_key(self, tag: str) -> str:
        """Written after the results: their digest and row count; its presence means done."""
        return f"{self.prefix}/results.{tag}.meta.json"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChunkRef:
        fields = ("run_id", "input_digest", "index", "first_row", "rows")
        return cls(**{k: data[k] for k in fields}, sha256=data.get("sha256"))
