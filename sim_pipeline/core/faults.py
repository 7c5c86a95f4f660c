"""Faults as one sentence, and SIGTERM as an orderly stop.

A run that meets a fault (a full disk, a database or object store that went away, a file it may
not write) ends with one line naming what failed and what to do; the traceback is for
``--debug`` or ``SIM_PIPELINE_DEBUG=1``. SIGTERM stops a run the way Ctrl-C does: worker
processes stop, the run is marked failed, and rerunning the same command resumes it.
"""

from __future__ import annotations

import errno
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

RESUME = "rerun the same command: it resumes where it stopped"
INTERRUPTED = "interrupted; rerun the same command to resume"
STOPPED = "stopped by SIGTERM; rerun the same command to resume"


class Terminated(BaseException):
    """SIGTERM arrived; unwinds the stack like ``KeyboardInterrupt`` (so cleanup runs)."""


@contextmanager
def sigterm_stops() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def known_fault(error: BaseException) -> str | None:
    """One sentence for a fault a user can act on, or None for what looks like a bug."""
    if isinstance(error, OSError):
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"No space left on the device{where}: free some space, then {RESUME}."
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"Not allowed to write{where} ({error.strerror}): fix that, then {RESUME}."
        return f"{error.strerror or error}{where}: fix that, then {RESUME}."
    if "sqlalchemy" in sys.modules:
        from sqlalchemy.exc import DBAPIError

        if isinstance(error, DBAPIError):
            reason = str(error.orig or error).strip().splitlines()[0]
            return f"The results database failed ({reason}): once it is back, {RESUME}."
    return None


def fault_sentence(error: BaseException) -> str:
    """The one sentence a failed run ends with, on stderr and in its ``scoring_runs`` row."""
    from sim_pipeline.core.errors import UserError

    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(error, Terminated):
        return STOPPED
    sentence = known_fault(error)
    if sentence is not None:
        return sentence
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return (f"unexpected {type(error).__name__}{': ' + first if first else ''}; rerun with "
            "--debug to see where, and report it")
