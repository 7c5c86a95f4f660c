"""The one place where flags and ``SIM_PIPELINE_*`` environment variables become ``Settings``.

Everything downstream receives a frozen ``Settings``; nothing else reads the environment.
"""

from __future__ import annotations

import dataclasses
import os
import re
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


def setting(default: Any, help: str, **options: Any) -> Any:  # noqa: A002
    """A ``Settings`` field with its help text: the flag's help and docs/configuration.md's."""
    return field(default=default, metadata={"help": help}, **options)


@dataclass(frozen=True)
class Settings:
    """Every knob of a run. Field names map to ``SIM_PIPELINE_<NAME>`` env vars and ``--name``."""

    model: str = setting(DEFAULT_MODEL, "hub id or folder saved by save_pretrained")
    store: str = setting("./.sim-pipeline/store", "object store: a folder or s3://bucket/prefix")
    database_url: str = setting("sqlite:///./.sim-pipeline/results.db",
                                "SQLAlchemy URL of the results database")
    device: str = setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda, mps")
    precision: str = setting("auto", "auto (fp16 on cuda, bf16 on CPUs with bf16 matrix "
                             "instructions, fp32 elsewhere), fp32, fp16, bf16")
    backend: str = setting("torch", "torch, or ONNX Runtime: onnx, onnx-int8")
    batch_size: int = setting(32, "images or captions per forward pass")
    chunk_size: int = setting(10_000, "rows per chunk")
    fetch_concurrency: int = setting(32, "downloads in flight")
    fetch_timeout: float = setting(20.0, "seconds allowed per image")
    max_image_bytes: int = setting(20 * 1024 * 1024, "larger images are too_large")
    url_column: str | None = setting(None, "URL column name (default: found by its values)")
    caption_column: str | None = setting(None, "caption column name (default: found by its "
                                         "values)")
    user_agent: str = setting("sim-pipeline/0.1 (caption-image similarity scoring)",
                              "sent with every image request")
    fetch_per_host: int = setting(8, "at most this many requests to one host at a time")
    fetch_retries: int = setting(3, "retries after a connection error, 408, 429 or 5xx (with "
                                 "backoff)")
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "refuse larger images (width x height) "
                              "before decoding them")
    allow_hosts: str = setting("", "host[:port],... exempt from the private-address guard")
    refetch_errors: bool = setting(False, "fetch again URLs whose cached fetch failed (after "
                                   "changing limits)")
    fetch_processes: int = setting(0, "0: one per CPU core, for chunks of 1,000+ URLs")
    db_retry_seconds: float = setting(DEFAULT_RETRY_SECONDS, "how long writes retry a results "
                                      "database that stopped answering")
    inference_url: str = setting("", "embed through this `sim-pipeline serve` instead of a "
                                 "model in-process")
    inference_api_key: str = setting("", "the service's API key, if it asks for one",
                                     repr=False)
    # `sim-pipeline spark` with a local master: docs/spark.md.
    jvm_archives: str = setting("", "folder for the class-data archives a local Spark master's "
                                "JVMs start from (default: ~/.cache/sim-pipeline/jvm), or off")
    # Drift between runs (`results drift`, the report, the score_drift DAG): docs/results.md.
    canary_csv: str = setting("", "CSV of canary pairs scored with every run; a canary whose "
                              "score moves means the model or preprocessing changed")
    drift_reference: str = setting("", "run compared with when the input has no earlier "
                                   "succeeded run")
    drift_cutoff: float = setting(0.6, "drift compares the share of scores above this")
    drift_psi_watch: float = setting(0.1, "PSI at which drift says watch")
    drift_psi_alert: float = setting(0.25, "PSI at which drift alerts")
    drift_wasserstein_alert: float = setting(0.1, "Wasserstein distance over the reference's "
                                             "std at which drift alerts")
    drift_error_points_alert: float = setting(5.0, "drift alerts when an error code's share of "
                                              "rows rises by this many points")
    # Given by code (an Airflow connection), never by a flag or env var: boto3 reads its own.
    s3: S3Options | None = field(default=None, repr=False, metadata={"internal": True})

    def __post_init__(self) -> None:
        _check_choice("device", self.device, DEVICES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("backend", self.backend, BACKENDS)
        for name in ("batch_size", "chunk_size", "fetch_concurrency", "max_image_bytes",
                     "fetch_per_host", "max_pixels"):
            if getattr(self, name) < 1:
                raise SettingError(name, getattr(self, name), "must be a positive integer")
        if self.fetch_timeout <= 0:
            raise SettingError("fetch_timeout", self.fetch_timeout,
                               "must be a positive number of seconds")
        if self.db_retry_seconds < 0:
            raise SettingError("db_retry_seconds", self.db_retry_seconds,
                               "must be zero or a number of seconds")
        for name in ("fetch_retries", "fetch_processes"):
            if getattr(self, name) < 0:
                raise SettingError(name, getattr(self, name), "must be zero or a positive integer")
        _check_store(self.store)
        if not DATABASE_URL.match(self.database_url):
            raise SettingError("database_url", _masked(self.database_url),
                               "is not a database URL (dialect://...)")
        _check_allow_hosts(self.allow_hosts)
        for name in ("drift_psi_watch", "drift_psi_alert", "drift_wasserstein_alert",
                     "drift_error_points_alert"):
            if getattr(self, name) < 0:
                raise SettingError(name, getattr(self, name), "must be zero or a positive number")

    @property
    def variant(self) -> str:
        """What, besides the model, decides the embeddings: the precision or the ONNX backend."""
        return self.precision if self.backend == "torch" else self.backend

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def user_settings() -> list[dataclasses.Field[Any]]:
    """The fields a user sets by flag or ``SIM_PIPELINE_<NAME>``."""
    return [f for f in dataclasses.fields(Settings) if not f.metadata.get("internal")]


class SettingError(UserError):
    """A setting's value is refused. Named as its env var; ``given_as`` names the flag instead
    when the value came from one, so the sentence names what the user typed."""

    def __init__(self, name: str, value: Any, problem: str) -> None:
        self.name, self.value, self.problem = name, value, problem
        super().__init__(self.given_as(f"{ENV_PREFIX}{name.upper()}="))

    def given_as(self, prefix: str) -> str:
        return f"{prefix}{self.value!r} {self.problem}."


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


# What SQLAlchemy's make_url accepts at the start: dialect[+driver]://
DATABASE_URL = re.compile(r"^[\w+]+://")


def _masked(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def _check_store(location: str) -> None:
    scheme, _, rest = location.partition("://")
    if scheme == "s3" and not rest.split("/")[0]:
        raise SettingError("store", location, "names no bucket (use s3://bucket/prefix)")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SettingError(name, value, f"is not one of {', '.join(choices)}")


def _check_allow_hosts(text: str) -> None:
    if not text.strip():
        return
    from sim_pipeline.core.urls import parse_allowlist  # httpx: only when a run needs it

    try:
        parse_allowlist(text)
    except ValueError as error:
        raise SettingError("allow_hosts", text, f"is refused: {error}; use "
                           "host[:port],host[:port]") from None


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
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
    flags: bool = False,
) -> Settings:
    """Defaults, then ``SIM_PIPELINE_*`` env vars, then explicit overrides. With ``flags``, the
    overrides are command-line flags, and a refused one is named as the flag."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in user_settings():
        raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw not in (None, ""):
            kind = {"int": int, "float": float, "bool": _parse_bool}.get(str(f.type), str)
            values[f.name] = _coerce(f.name, raw, kind)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        return Settings(**{**values, **given})
    except SettingError as refused:
        if flags and refused.name in given:
            raise UserError(refused.given_as(f"{flag_of(refused.name)} ")) from None
        raise


# The other SIM_PIPELINE_* variables: not run settings (they never travel to pods or tasks in a
# Settings), but read here all the same.
DEBUG = "DEBUG"  # show tracebacks
RUN_ID = "RUN_ID"  # the run a `stage` command works on, when --run-id is not given
API_KEYS = "API_KEYS"  # the service's keys: kept out of Settings, whose reprs end up in logs
# The Airflow glue's knobs (plugins/sim_airflow/options.py says what each does).
AIRFLOW_OPTIONS = frozenset({
    "SCHEDULE", "EXECUTION", "POD", "NIGHTLY_INPUT", "PROGRESS_SECONDS", "STORE_CONN_ID",
    "RESULTS_CONN_ID", "RETRY_DELAY_SECONDS", "INFERENCE_QUEUE", "WORKER_NAME"})


def variable(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """``SIM_PIPELINE_<NAME>`` for a variable that is not a setting; None when unset or empty."""
    if name not in AIRFLOW_OPTIONS | {DEBUG, RUN_ID, API_KEYS}:
        raise KeyError(f"{ENV_PREFIX}{name} is not a variable sim-pipeline reads")
    return (os.environ if environ is None else environ).get(ENV_PREFIX + name) or None


def debug_requested(flag: bool = False) -> bool:
    """``--debug`` or ``SIM_PIPELINE_DEBUG=1``: show the traceback of a failure."""
    return flag or (variable(DEBUG) or "").strip().lower() in TRUE_WORDS


def run_id_given(flag: str | None) -> str | None:
    """The run a command names: ``--run-id``, else ``SIM_PIPELINE_RUN_ID``."""
    return flag or variable(RUN_ID)


def api_keys(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """``SIM_PIPELINE_API_KEYS``: the service's keys, comma-separated."""
    raw = variable(API_KEYS, environ) or ""
    return tuple(k.strip() for k in raw.split(",") if k.strip())
