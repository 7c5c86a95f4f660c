"""What a task does around its library stage; ``sim_pipeline.runners.dispatch`` does the work.

This module only adapts them to Airflow: the run id is Airflow's run id, runs without ``csv_path``
read the nightly input of their logical date (and skip when it is missing), s3:// inputs and outputs
travel through the aws connection (the amazon provider's ``S3Hook``; the library's store gets the
same connection as ``Settings.s3``), and the plan never needs more mapped tasks than Airflow allows.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from airflow.sdk import Context, get_current_context
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from sim_airflow.options import nightly_input
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


def input_exists(location: str) -> bool:
    if is_s3(location):
        bucket, key = split_s3(location)
        return bool(s3_hook().check_for_key(key, bucket))
    return Path(location).is_file()


def check_input(location: str, context: Context) -> None:
    """A missing nightly input skips the run; a missing ``csv_path`` is a mistake and fails it."""
    if input_exists(location):
        return
    if context["params"].get("csv_path"):
        raise AirflowFailException(f"Input {location} does not exist.")
    raise AirflowSkipException(f"No nightly input for {context.get('ds')}: {location} does not "
                               "exist, so this run scores nothing and skips.")


@contextmanager
def local_copy(location: str) -> Iterator[Path]:
    """The input as a local file: planning streams it, so an s3:// input is downloaded first."""
    if not is_s3(location):
        yield Path(location)
        return
    bucket, key = split_s3(location)
    with tempfile.TemporaryDirectory(prefix="sim-pipeline-input-") as folder:
        path = Path(folder) / PurePosixPath(key).name
        s3_hook().get_key(key, bucket).download_file(str(path))
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


def plan_run() -> list[Chunk]:
    """Plan the run's input into chunks and open the run, keyed by the Airflow run id."""
    from sim_pipeline.runners import dispatch as stages

    context = get_current_context()
    settings = task_settings(context["params"], run_id=context["run_id"])
    location = input_location(context, settings)
    check_input(location, context)
    with local_copy(location) as path:
        rows = count_rows(path, settings)
        if rows == 0:
            raise AirflowSkipException(f"Input {location} has a header but no rows: "
                                       "nothing to score.")
        chunk_size = fit_chunk_size(rows, settings.chunk_size, max_map_length())
        if chunk_size != settings.chunk_size:
            log.warning("Input %s has %d rows: chunk size grown from %d to %d so the run "
                        "stays within max_map_length=%d mapped tasks.", location, rows,
                        settings.chunk_size, chunk_size, max_map_length())
        planned = stages.plan(settings.replace(chunk_size=chunk_size), path, source=location)
    log.info("Run %s: %d rows of %s in %d chunks of up to %d rows.", planned["run_id"],
             planned["rows"], location, len(planned["chunks"]), chunk_size)
    return planned["chunks"]


def run_stage(stage: str, chunk: Mapping[str, Any]) -> dict[str, Any]:
    """One per-chunk stage (``fetch-images``, ``embed-images``, ...) on the chunk described."""
    from sim_pipeline.runners import dispatch as stages

    settings = task_settings(get_current_context()["params"], run_id=chunk["run_id"])
    result = stages.chunk_stage(stage, settings, int(chunk["index"]))
    log.info("%s, chunk %s of run %s (%s rows): %s", stage, chunk["index"], chunk["run_id"],
             chunk["rows"], result)
    return result


def default_output(location: str) -> str | None:
    """``<input>_scored.csv`` beside an s3:// input; None lets the library place a local one."""
    if not is_s3(location):
        return None
    from sim_pipeline.stages.finalize import default_output_path

    bucket, key = split_s3(location)
    return f"s3://{bucket}/{default_output_path(PurePosixPath(key)).as_posix()}"


def write_output(settings: Settings, output: str | None) -> dict[str, Any]:
    """Finalize to a local path, or to a temporary file uploaded to an s3:// output."""
    from sim_pipeline.runners import dispatch as stages

    if output is None or not is_s3(output):
        return stages.finalize(settings, output)
    bucket, key = split_s3(output)
    with tempfile.TemporaryDirectory(prefix="sim-pipeline-output-") as folder:
        result = stages.finalize(settings, Path(folder) / PurePosixPath(key).name)
        s3_hook().load_file(result["output"], key, bucket, replace=True)
        report_key = str(PurePosixPath(key).with_name(Path(result["report"]).name))
        s3_hook().load_file(result["report"], report_key, bucket, replace=True)
    return {**result, "output": output, "report": f"s3://{bucket}/{report_key}"}


def finalize_run(scored: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Write the scored CSV and close the run; the chunks' counts are summed for the log."""
    context = get_current_context()
    params = context["params"]
    settings = task_settings(params, run_id=context["run_id"])
    output = params.get("output_path") or default_output(input_location(context, settings))
    result = write_output(settings, output)
    counts = scored[:]  # one request for every chunk's counts, not one per chunk
    ok = sum(c["ok"] for c in counts)
    log.info("Run %s finished: %d rows, %d scored, %d with an error code; scored CSV at %s.",
             result["run_id"], result["rows"], ok, result["rows"] - ok, result["output"])
    return {**result, "ok": ok}
