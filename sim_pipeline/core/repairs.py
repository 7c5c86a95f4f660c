"""A tally of the damaged or missing objects a run found and recomputed.

Repairs happen deep inside the stages (a decode thread finds an image's bytes damaged, a stage
finds its input set missing), so they are noted here, with a warning each, and the run summary
reads the tally. Never a crash, never a damaged object used.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

log = logging.getLogger(__name__)
_lock = threading.Lock()
_tally: Counter[str] = Counter()


def note(kind: str, where: str, why: BaseException | str) -> None:
    """Record that ``where`` (an object of ``kind``) was damaged or missing and is recomputed."""
    reason = why if isinstance(why, str) else (str(why).split(":")[0] or type(why).__name__)
    log.warning("Recomputing %s %s (%s).", kind, where, reason)
    with _lock:
        _tally[kind] += 1


def taken() -> Counter[str]:
    """The tally so far, reset: what this run repaired."""
    with _lock:
        counts = Counter(_tally)
        _tally.clear()
    return counts
