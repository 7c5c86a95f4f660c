"""The one place where flags and ``SIM_PIPELINE_*`` environment variables become ``Settings``.

Everything downstream receives a frozen ``Settings``; nothing else reads the environment.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sim_pipeline.core.errors import UserError

if TYPE_CHECKING:
    from sim_pipeline.core.store import S3Options

ENV_PREFIX = "SIM_PIPELINE_"
DEFAULT_MODEL = "openai/clip-vit-base-patch32"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
BACKENDS = ("torch", "onnx", "onnx-int8")
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_RETRY_SECONDS = 60.0  # how long writes retry a results database that went away


@dataclass(frozen=True)
class Settings:
    """Every knob of a run. Field names map to ``SIM_PIPELINE_<NAME>`` env vars and ``--name``."""

    model: str = DEFAULT_MODEL
    store: str = "./.sim-pipeline/store"
    database_url: str = "sqlite:///./.sim-pipeline/results.db"
    device: str = "auto"
    precision: str = "auto"
    backend: str = "torch"
    batch_size: int = 32
    chunk_size: int = 10_000
    fetch_concurrency: int = 32
    fetch_timeout: float = 20.0
    max_image_bytes: int = 20 * 1024 * 1024
    run_id: str | None = None
    url_column: str | None = None
    caption_column: str | None = None
    user_agent: str = "sim-pipeline/0.1 (caption-image similarity scoring)"
    fetch_per_host: int = 8
    fetch_retries: int = 3
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_hosts: str = ""
    refetch_errors: bool = False
    fetch_processes: int = 0  # 0: one per CPU core, used when a chunk has enough URLs
    db_retry_seconds: float = DEFAULT_RETRY_SECONDS
    inference_url: str = ""  # an inference service (`sim-pipeline serve`) to embed with
    inference_api_key: str = field(default="", repr=False)
    # Drift between runs (`results drift`, the report, the score_drift DAG): docs/results.md.
    canary_csv: str = ""  # canary pairs scored with every run; a moved score: model changed
    drift_reference: str = ""  # the run compared with when the input has no earlier run
    drift_cutoff: float = 0.6  # the share of scores above this is compared
    drift_psi_watch: float = 0.1
    drift_psi_alert: float = 0.25
    drift_wasserstein_alert: float = 0.1  # Wasserstein distance over the reference's std
    drift_error_points_alert: float = 5.0  # an error code's share up by this many points
    # Given by code (an Airflow connection), never by a flag or env var: boto3 reads its own.
    s3: S3Options | None = field(default=None, repr=False, metadata={"internal": True})

    def __post_init__(self) -> None:
        _check_choice("device", self.device, DEVICES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("backend", self.backend, BACKENDS)
        for name in ("batch_size", "chunk_size", "fetch_concurrency", "max_image_bytes",
                     "fetch_per_host", "max_pixels"):
            if getattr(self, name) < 1:
                raise UserError(f"{ENV_PREFIX}{name.upper()} must be a positive integer.")
        if self.fetch_timeout <= 0:
            raise UserError(f"{ENV_PREFIX}FETCH_TIMEOUT must be a positive number of seconds.")
        if self.db_retry_seconds < 0:
            raise UserError(f"{ENV_PREFIX}DB_RETRY_SECONDS must be zero or a number of seconds.")
        for name in ("fetch_retries", "fetch_processes"):
            if getattr(self, name) < 0:
                raise UserError(f"{ENV_PREFIX}{name.upper()} must be zero or a positive integer.")
        _check_allow_hosts(self.allow_hosts)
        for name in ("drift_psi_watch", "drift_psi_alert", "drift_wasserstein_alert",
                     "drift_error_points_alert"):
            if getattr(self, name) < 0:
                raise UserError(f"{ENV_PREFIX}{name.upper()} must be zero or a positive number.")

    @property
    def variant(self) -> str:
        """What, besides the model, decides the embeddings: the precision or the ONNX backend."""
        return self.precision if self.backend == "torch" else self.backend

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def user_settings() -> list[dataclasses.Field[Any]]:
    """The fields a user sets by flag or ``SIM_PIPELINE_<NAME>``."""
    return [f for f in dataclasses.fields(Settings) if not f.metadata.get("internal")]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(
            f"{ENV_PREFIX}{name.upper()}={value!r} is not one of {', '.join(choices)}."
        )


def _check_allow_hosts(text: str) -> None:
    if not text.strip():
        return
    from sim_pipeline.core.urls import parse_allowlist  # httpx: only when a run needs it

    try:
        parse_allowlist(text)
    except ValueError as error:
        raise UserError(f"{ENV_PREFIX}ALLOW_HOSTS: {error}; use host[:port],host[:port].") \
            from None


TRUE_WORDS = ("1", "true", "yes", "on")


def _parse_bool(raw: str) -> bool:
    if raw.strip().lower() in TRUE_WORDS:
        return True
    if raw.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _coerce(name: str, raw: str, kind: Any) -> Any:
    try:
        return kind(raw)
    except ValueError:
        kind_name = "boolean (true/false)" if kind is _parse_bool else kind.__name__
        raise UserError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind_name}.") \
            from None


def load_settings(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Defaults, then ``SIM_PIPELINE_*`` env vars, then explicit overrides (flags)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in user_settings():
        raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw not in (None, ""):
            kind = {"int": int, "float": float, "bool": _parse_bool}.get(str(f.type), str)
            values[f.name] = _coerce(f.name, raw, kind)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return Settings(**values)
