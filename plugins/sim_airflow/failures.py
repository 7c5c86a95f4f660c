"""Which failures a retry can cure, and what the user reads when it cannot.

The library raises ``UserError`` for problems a person must fix: an input that is missing or not
a CSV, a column that is not there, a model that cannot be loaded. Retrying those only delays the
red square (a CSV without a caption column used to fail after 138 s of backoff), so they fail the
task at once with ``AirflowFailException``, in one sentence that names the trigger form's field
to change. A ``UserError`` raised while the store or the results database could not be *reached*
is a network problem, not the user's: it stays retryable, as does every other exception.

Whatever a task fails with, its log ends with the one sentence (``ends_in_one_sentence``): the
traceback first (at DEBUG for a mistake a person must fix, unless ``SIM_PIPELINE_DEBUG`` is set;
at ERROR otherwise), then the sentence, then the failure raised again as a short exception whose
message is that sentence, so the task runner's own "Task failed with exception", the last thing
it logs outside the collapsed "Post Execute" group, ends in it too.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import PurePath

from airflow.sdk.exceptions import (
    AirflowException,
    AirflowFailException,
    AirflowRescheduleException,
    AirflowSkipException,
    AirflowTaskTerminated,
    AirflowTaskTimeout,
    DownstreamTasksSkipped,
    TaskDeferred,
)

log = logging.getLogger(__name__)

# The trigger form's fields (sim_airflow.options.params), by the part of the library whose
# UserError they fix: the model loader, else the input's reader.
MODEL_FIELD, INPUT_FIELD, OUTPUT_FIELD = "model", "csv_path", "output_path"
MODEL_CODE = ("sim_pipeline", "stages", "embed")
# A fix hint written for the CLI ("; check --caption-column.", "; set SIM_PIPELINE_MODEL (or
# --model) to ..."): in Airflow the form's field is the place to fix it, so the hint is dropped.
CLI_HINT = re.compile(r"; [^;]*(--[a-z]|SIM_PIPELINE_)[^;]*$")


def is_connection_problem(error: BaseException) -> bool:
    """True when the error, or the one it was raised while handling, is a connection problem."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from sqlalchemy.exc import InterfaceError, OperationalError

    transient = (ConnectionError, TimeoutError, BotoConnectionError, OperationalError,
                 InterfaceError)
    return isinstance(error, transient) or isinstance(error.__context__, transient)


def raised_in(error: BaseException, parts: tuple[str, ...]) -> bool:
    """Whether the innermost frame of the error's traceback is in the package ``parts``."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    path = PurePath(frames[-1].filename).parts
    return any(path[i:i + len(parts)] == parts for i in range(len(path)))


def form_field(error: BaseException, default: str) -> str:
    return MODEL_FIELD if raised_in(error, MODEL_CODE) else default


def form_sentence(message: str, field: str) -> str:
    """The library's sentence without its CLI hint, pointing at the trigger form's field."""
    reason = CLI_HINT.sub("", message.strip()).rstrip(".")
    return f"{reason}; check the trigger form's {field!r} field."


@contextmanager
def fail_at_once_when_hopeless(field: str) -> Iterator[None]:
    """Turn the library's non-transient ``UserError`` into ``AirflowFailException`` (no retry).

    ``field`` is the form field the block's input came from; a model that cannot be loaded
    names ``model`` wherever it is noticed.
    """
    from sim_pipeline.core.errors import UserError

    try:
        yield
    except UserError as error:
        if is_connection_problem(error):
            raise
        raise AirflowFailException(form_sentence(str(error), form_field(error, field))) \
            from error


class TaskFailed(AirflowException):
    """A failure a retry may cure, carried as its one sentence (retried like any other)."""


# What a task raises to tell the task runner something other than "this try failed".
NOT_FAILURES = (AirflowSkipException, AirflowRescheduleException, TaskDeferred,
                DownstreamTasksSkipped, AirflowTaskTimeout, AirflowTaskTerminated)


def task_sentence(error: BaseException) -> str:
    """The failure in one sentence: the task's or the library's own, else the fault's kind."""
    from sim_pipeline.core.errors import UserError
    from sim_pipeline.core.faults import known_fault

    if isinstance(error, (AirflowException, UserError)):
        return str(error).strip() or type(error).__name__
    known = known_fault(error)
    if known is not None:
        return known
    first = (str(error).strip().splitlines() or [""])[0]
    return f"unexpected {type(error).__name__}{': ' + first if first else ''}; its traceback " \
           "is above."


def traceback_level(error: Exception) -> int:
    """DEBUG for a mistake a person must fix (the sentence says which), unless debugging is
    asked for; ERROR for the rest, whose traceback says where."""
    from sim_pipeline.core.config import debug_requested

    hopeless = isinstance(error, AirflowFailException)
    return logging.DEBUG if hopeless and not debug_requested() else logging.ERROR


@contextmanager
def ends_in_one_sentence() -> Iterator[None]:
    """Around a task's body: on failure, log the traceback, then the sentence, and raise the
    failure again as a short exception of the same retry kind with only that sentence."""
    try:
        yield
    except NOT_FAILURES:
        raise
    except Exception as error:
        sentence = task_sentence(error)
        log.log(traceback_level(error), "Where it failed:", exc_info=True)
        log.error(sentence)
        if isinstance(error, AirflowFailException):
            raise AirflowFailException(sentence) from None
        raise TaskFailed(sentence) from None
