"""Files that appear whole or not at all: the scored CSV, reports, exports, store objects.

Written to a temporary name in the destination folder, then renamed over the destination, so a
reader (or a crash) never sees half a file. The temporary file is created with the usual
permissions (0666 less the umask), not ``mkstemp``'s 0600, so the result is as readable as any
file the user writes.

A temporary name says who wrote it: ``.<name>.<host>.<pid>-<tag>.tmp`` (``host``: a short hash of
the host name). A process killed mid-write (``kill -9``, a lost node) leaves its temporary file
behind; one whose writer is gone (same host, process ended) or that is older than
``STALE_TEMP_SECONDS`` is debris, and is removed by the next successful write of the same file,
by a run's finish (``LocalStore.sweep_temporaries``) and by ``store verify --repair``.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TextIO

STALE_TEMP_SECONDS = 3600.0  # a temporary file of another host is debris after this long
HOST_TAG = hashlib.sha256(socket.gethostname().encode("utf-8")).hexdigest()[:8]
_TEMP_NAME = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<host>[0-9a-f]{8})\.)?(?P<pid>\d+)-\w+\.tmp$")


def temp_name(name: str, tag: object) -> str:
    """The temporary name for writing ``name`` in this process."""
    return f".{name}.{HOST_TAG}.{os.getpid()}-{tag}.tmp"


def is_temp_name(name: str) -> bool:
    return _TEMP_NAME.match(name) is not None


def is_stale_temp(path: str | Path, now: float | None = None) -> bool:
    """Whether ``path`` is a temporary file nobody will finish: its writer ran on this host and
    has ended, or it is older than ``STALE_TEMP_SECONDS`` (a writer elsewhere that died)."""
    match = _TEMP_NAME.match(os.path.basename(path))
    if match is None:
        return False
    try:
        age = (now or time.time()) - os.stat(path).st_mtime
    except FileNotFoundError:
        return False
    if age > STALE_TEMP_SECONDS:
        return True
    return match["host"] == HOST_TAG and not process_alive(int(match["pid"]))


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def stale_temps_beside(path: str | Path) -> Iterator[Path]:
    """Stale temporary files left by earlier writers of ``path`` in its folder."""
    path = Path(path)
    with suppress(FileNotFoundError):
        for entry in os.scandir(path.parent):
            match = _TEMP_NAME.match(entry.name)
            if match and match["name"] == path.name and is_stale_temp(entry.path):
                yield Path(entry.path)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A fresh temporary path beside ``path``; renamed onto it if the block succeeds, and then
    the debris of earlier writers of ``path`` that were killed is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_name(path.name, secrets.token_hex(4)))
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for stale in stale_temps_beside(path):
        stale.unlink(missing_ok=True)


@contextmanager
def atomic_text(path: str | Path, newline: str | None = None) -> Iterator[TextIO]:
    """A UTF-8 text file written through ``atomic_path``."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline=newline) as handle:
        yield handle
