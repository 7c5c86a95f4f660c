"""Counting the damaged or missing objects a run found and recomputed.

Repairs happen deep inside the stages (a decode thread finds an image's bytes damaged, a stage
finds its input set missing). Each is noted here, with its detail at debug level, into the tally
of the step that is running (``counted``): a context variable, so concurrent runs and service
requests never mix their counts, and threads started for the step count into it too when they
run ``carried`` work. Fetch workers count their own and send the counts back with
their statistics. The runner sums the steps' tallies into the run summary and warns once per
kind of object; a repair outside any counted step (the service's) is a warning of its own. Never a
crash, never a damaged object used.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import ParamSpec, TypeVar

log = logging.getLogger(__name__)
_lock = threading.Lock()
P = ParamSpec("P")
R = TypeVar("R")
_tally: ContextVar[Counter[str] | None] = ContextVar("repairs", default=None)


@contextmanager
def counted() -> Iterator[Counter[str]]:
    """The repairs noted within the block (and not within a nested ``counted`` block)."""
    found: Counter[str] = Counter()
    token = _tally.set(found)
    try:
        yield found
    finally:
        _tally.reset(token)


def note(kind: str, where: str, why: BaseException | str) -> None:
    """Record that ``where`` (an object of ``kind``) was damaged or missing and is recomputed."""
    reason = why if isinstance(why, str) else (str(why).split(":")[0] or type(why).__name__)
    counted_here = _tally.get() is not None  # else no step sums it up: warn about this one
    log.log(logging.DEBUG if counted_here else logging.WARNING, "Recomputing %s %s (%s).",
            kind, where, reason)
    add(Counter({kind: 1}))


def add(found: Counter[str]) -> None:
    """Count repairs made elsewhere (in a worker process) into the running step's tally."""
    tally = _tally.get()
    if tally is not None and found:
        with _lock:
            tally.update(found)


def warn(found: Counter[str]) -> None:
    """One warning per kind of object repaired, with its count."""
    for kind, count in sorted(found.items()):
        log.warning("Recomputed %d damaged or missing %s object%s.", count, kind,
                    "" if count == 1 else "s")


def carried(work: Callable[P, R]) -> Callable[P, R]:
    """``work`` counting its repairs into the calling step's tally on whichever thread runs it
    (pool threads do not inherit the caller's context)."""
    tally = _tally.get()

    @functools.wraps(work)
    def counted_work(*args: P.args, **kwargs: P.kwargs) -> R:
        token = _tally.set(tally)
        try:
            return work(*args, **kwargs)
        finally:
            _tally.reset(token)

    return counted_work
