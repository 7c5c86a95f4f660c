"""Which failures a retry can cure, and what the user reads when it cannot.

The library raises ``UserError`` for problems a person must fix: an input that is missing or not
a CSV, a column that is not there, a model that cannot be loaded. Retrying those only delays the
red square (a CSV without a caption column used to fail after 138 s of backoff), so they fail the
task at once with ``AirflowFailException``, in one sentence that names the trigger form's field
to change. A ``UserError`` raised while the store or the results database could not be *reached*
is a network problem, not the user's: it stays retryable, as does every other exception.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import PurePath

from airflow.sdk.exceptions import AirflowFailException

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
