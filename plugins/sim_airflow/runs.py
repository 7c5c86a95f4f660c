"""What a task does around its library stage; ``sim_pipeline.runners.dispatch`` does the work.

This module only adapts them to Airflow: the run id is Airflow's run id, runs without ``csv_path``
read the nightly input of their logical date (and skip when it is missing), s3:// inputs and outputs
travel through the aws connection (the amazon provider's ``S3Hook``; the library's store gets the
same connection as ``Settings.s3``), the plan never needs more mapped tasks than Airflow allows, an
input or model no retry can fix fails the task at once (``failures``), a failed task's log ends with
its one sentence (``failures.ends_in_one_sentence``), and each stage's log says how it is going
(``progress``). Unless the run's ``output_path`` says otherwise, its scored CSV and
report are named after the run id, beside the input, so runs never overwrite each other.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from airflow.sdk import Context, get_current_context
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from sim_airflow.assets import emit_scored
from sim_airflow.failures import (
    INPUT_FIELD,
    MODEL_FIELD,
    OUTPUT_FIELD,
    ends_in_one_sentence,
    fail_at_once_when_hopeless,
)
from sim_airflow.labels import chunk_label
from sim_airflow.options import nightly_input
from sim_airflow.progress import progress_lines, summary
from sim_airflow.settings import s3_conn_id, task_settings

if TYPE_CHECKING:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from sim_pipeline.core.config import Settings

log = logging.getLogger(__name__)
Chunk = dict[str, Any]


def is_s3(location: str) -> bool:
    return location.startswith("s3://")


def s3_hook() -> S3Hook:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook(aws_conn_id=s3_conn_id())


def split_s3(location: str) -> tuple[str, str]:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook.parse_s3_url(location)


def input_location(context: Context, settings: Settings) -> str:
    """``csv_path`` if given, else the nightly input rendered for the run's logical date."""
    csv_path = (context["params"].get("csv_path") or "").strip()
    if csv_path:
        return csv_path
    if context.get("logical_date") is None:
        raise AirflowFailException('This run has no logical date to pick its nightly input by: '
                                   'trigger it with {"csv_path": "..."}.')
    return str(context["task"].render_template(nightly_input(settings.store), context))


def input_exists(location: str, hook: S3Hook | None = None) -> bool:
    if is_s3(location):
        bucket, key = split_s3(location)
        return bool((hook or s3_hook()).check_for_key(key, bucket))
    return Path(location).is_file()


def check_input(location: str, context: Context, hook: S3Hook | None = None) -> None:
    """A missing nightly input skips the run; a missing ``csv_path`` is a mistake and fails it."""
    if input_exists(location, hook):
        return
    if context["params"].get("csv_path"):
        raise AirflowFailException(f"Input {location} does not exist; check the trigger form's "
                                   f"{INPUT_FIELD!r} field.")
    skip(f"No nightly input for {context.get('ds')}: {location} does not exist, so this run "
         "scores nothing and skips.")


def skip(reason: str) -> None:
    """Skip the task, saying why at INFO first: the skip's own message lands in a collapsed
    log group that nobody opens."""
    log.info(reason)
    raise AirflowSkipException(reason)


@contextmanager
def local_copy(location: str, hook: S3Hook | None = None) -> Iterator[Path]:
    """The input as a local file: planning streams it, so an s3:// input is downloaded first."""
    if not is_s3(location):
        yield Path(location)
        return
    bucket, key = split_s3(location)
    with tempfile.TemporaryDirectory(prefix="sim-pipeline-input-") as folder:
        path = Path(folder) / PurePosixPath(key).name
        (hook or s3_hook()).get_key(key, bucket).download_file(str(path))
        yield path


def max_map_length() -> int:
    from airflow.sdk.configuration import conf

    return conf.getint("core", "max_map_length", fallback=1024)


def fit_chunk_size(rows: int, chunk_size: int, max_chunks: int) -> int:
    """The smallest chunk size, at least ``chunk_size``, that splits ``rows`` into few enough."""
    return max(chunk_size, math.ceil(rows / max_chunks))


def count_rows(path: Path, settings: Settings) -> int:
    from sim_pipeline.stages.plan import read_rows

    *_, rows = read_rows(path, settings)
    return sum(1 for _ in rows)


def record_failed_plan(settings: Settings, run_id: str, source: str, failure: str) -> None:
    """A run that fails before or while planning still gets its ``scoring_runs`` row, failed,
    so ``sim-pipeline results runs`` shows it (best effort: the database may be the failure)."""
    from sim_pipeline.core.errors import UserError
    from sim_pipeline.runners import dispatch

    try:
        dispatch.fail(settings, run_id, failure, source)
    except UserError:
        log.warning("Run %s could not be recorded as failed in the results database.", run_id,
                    exc_info=True)


@ends_in_one_sentence()
def plan_run() -> list[Chunk]:
    """Plan the run's input into chunks and open the run, keyed by the Airflow run id; a run
    that cannot be planned is recorded failed before the task fails."""
    context = get_current_context()
    settings = task_settings(context["params"])
    location = input_location(context, settings)
    try:
        return plan_chunks(context, settings, location)
    except AirflowFailException as error:
        record_failed_plan(settings, context["run_id"], location, str(error))
        raise


def plan_chunks(context: Context, settings: Settings, location: str) -> list[Chunk]:
    from sim_pipeline.runners import dispatch
    from sim_pipeline.runners.lifecycle import check_model_folder

    if not settings.inference_url:  # else the model server holds it, and plan asks it
        with fail_at_once_when_hopeless(MODEL_FIELD):
            check_model_folder(settings.model)
    hook = s3_hook() if is_s3(location) else None  # one for the check and the download
    check_input(location, context, hook)
    with fail_at_once_when_hopeless(INPUT_FIELD), local_copy(location, hook) as path:
        rows = count_rows(path, settings)
        if rows == 0:
            skip(f"Input {location} has a header but no rows: nothing to score.")
        chunk_size = fit_chunk_size(rows, settings.chunk_size, max_map_length())
        if chunk_size != settings.chunk_size:
            log.warning("Input %s has %d rows: chunk size grown from %d to %d so the run "
                        "stays within max_map_length=%d mapped tasks.", location, rows,
                        settings.chunk_size, chunk_size, max_map_length())
        planned = dispatch.plan(settings.replace(chunk_size=chunk_size), path, source=location,
                                run_id=context["run_id"])
    log.info("Run %s: %d rows of %s in %d chunks of up to %d rows.", planned["run_id"],
             planned["rows"], location, len(planned["chunks"]), chunk_size)
    return planned["chunks"]


@ends_in_one_sentence()
def run_chunk_stage(stage: str, chunk: Mapping[str, Any]) -> dict[str, Any]:
    """One per-chunk stage (``fetch-images``, ``embed-images``, ...) on the chunk described."""
    from sim_pipeline.runners import dispatch

    settings = task_settings(get_current_context()["params"])
    what = f"{stage}, {chunk_label(chunk)}"
    started = time.monotonic()
    with fail_at_once_when_hopeless(INPUT_FIELD), progress_lines(what):
        result = dispatch.chunk_stage(stage, settings, chunk["run_id"], int(chunk["index"]))
    log.info(summary(what, int(chunk["rows"]), time.monotonic() - started, result))
    return result


def safe_run_id(run_id: str) -> str:
    """The run id as part of a file name: ``manual__2025-01-01T00:00:00+00:00`` becomes
    ``manual__2025-01-01T00-00-00-00-00`` (no colons or plus signs, which shells and some
    file systems and S3 tools mishandle)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", run_id).strip("-")


def default_output(location: str, run_id: str) -> str:
    """``<input>_<run id>_scored.csv`` beside the input (local or s3://)."""
    from sim_pipeline.stages.finalize import default_output_path

    def named(path: PurePosixPath) -> str:
        tagged = path.with_name(f"{path.stem}_{safe_run_id(run_id)}{path.suffix}")
        return default_output_path(tagged).as_posix()

    if not is_s3(location):
        return named(PurePosixPath(Path(location).resolve().as_posix()))
    bucket, key = split_s3(location)
    return f"s3://{bucket}/{named(PurePosixPath(key))}"


def check_writable(output: str) -> None:
    """A local output whose folder cannot be made or written fails at once: no retry fixes it."""
    folder = Path(output).absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the library creates the missing folders below this one
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise AirflowFailException(f"Cannot write the scored CSV to {output}: {folder} is not a "
                                   f"writable folder; check the trigger form's {OUTPUT_FIELD!r} "
                                   "field.")


def write_output(settings: Settings, run_id: str, output: str) -> dict[str, Any]:
    """Finalize to a local path, or to a temporary file uploaded to an s3:// output."""
    from sim_pipeline.runners import dispatch

    if not is_s3(output):
        check_writable(output)
        return dispatch.finalize(settings, run_id, output)
    bucket, key = split_s3(output)
    with tempfile.TemporaryDirectory(prefix="sim-pipeline-output-") as folder:
        result = dispatch.finalize(settings, run_id, Path(folder) / PurePosixPath(key).name)
        hook = s3_hook()
        hook.load_file(result["output"], key, bucket, replace=True)
        report_key = str(PurePosixPath(key).with_name(Path(result["report"]).name))
        hook.load_file(result["report"], report_key, bucket, replace=True)
    return {**result, "output": output, "report": f"s3://{bucket}/{report_key}"}


@ends_in_one_sentence()
def finalize_run(scored: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> dict[str, Any]:
    """Write the scored CSV and close the run; the chunks' counts are summed for the log."""
    context = get_current_context()
    params = context["params"]
    settings = task_settings(params)
    output = (params.get("output_path") or "").strip() or default_output(
        input_location(context, settings), context["run_id"])
    with fail_at_once_when_hopeless(OUTPUT_FIELD):
        result = write_output(settings, context["run_id"], output)
    emit_scored(context, settings, result)  # score_drift is scheduled on it
    # Every chunk's counts in one request; a run of one chunk gets that chunk's dict alone.
    counts = [scored] if isinstance(scored, Mapping) else scored[:]
    ok = sum(c["ok"] for c in counts)
    log.info("Run %s finished in %.1f s: %d rows, %d scored, %d with an error code; scored CSV "
             "at %s, report at %s.", result["run_id"], run_seconds(context), result["rows"], ok,
             result["rows"] - ok, result["output"], result["report"])
    return {**result, "ok": ok}


def run_seconds(context: Context) -> float:
    """The whole DAG run's wall time so far (from its start), not this task's: the last task's
    "finished in" is the run's."""
    from datetime import UTC, datetime

    began = context["dag_run"].start_date
    return (datetime.now(UTC) - began).total_seconds() if began else 0.0
