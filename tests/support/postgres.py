"""A PostgreSQL server for the tests: the one on 127.0.0.1:5432, or a throwaway cluster.

Tests use a real PostgreSQL, never a stand-in. A developer machine often has PostgreSQL installed
but not running, so when nothing answers on the admin URL the test session starts its own server
from the system's binaries (``initdb`` + ``pg_ctl`` in a temporary directory, a free loopback
port, trust authentication) and stops it at the end. Only missing binaries stop the tests.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

# Tests read the admin URL from here (set it to use another server, or a dead port to force the
# throwaway cluster); the default is the usual local server.
ADMIN_URL_ENV = "SIM_TEST_PG_ADMIN_URL"
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
BINARY_DIRS = "/usr/lib/postgresql/*/bin"  # Debian/Ubuntu keep one folder per major version
INSTALL_HINT = ("PostgreSQL is not running on 127.0.0.1:5432 and its server programs (initdb, "
                "pg_ctl) are not installed: install them (Debian/Ubuntu: `apt-get install "
                "postgresql`) or start a server and set SIM_TEST_PG_ADMIN_URL to its URL.")


class PostgresUnavailable(RuntimeError):
    """Neither a running server nor the binaries to start one: the message says what to do."""


def answers(url: str) -> bool:
    """Whether a server accepts a connection at ``url`` within two seconds."""
    engine = sa.create_engine(url, connect_args={"connect_timeout": 2})
    try:
        with engine.connect():
            return True
    except sa.exc.OperationalError:
        return False
    finally:
        engine.dispose()


def find_binaries() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl``: PATH first, then the newest Debian version."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    candidates = [d for d in Path("/").glob(BINARY_DIRS.lstrip("/"))
                  if (d / "initdb").exists() and (d / "pg_ctl").exists()]
    if not candidates:
        raise PostgresUnavailable(INSTALL_HINT)
    return max(candidates, key=lambda d: int(re.sub(r"\D", "", d.parent.name) or 0))


def free_port() -> int:
    """A loopback port nothing listens on now (bound once, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _server_user() -> str | None:
    """initdb refuses to run as root: as root, run the server as the ``postgres`` system user."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable(
            "initdb cannot run as root and there is no `postgres` user: run the tests as "
            "another user or start PostgreSQL on 127.0.0.1:5432.") from None
    return "postgres"


def _run(command: list[str], user: str | None) -> None:
    done = subprocess.run(command, user=user, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise PostgresUnavailable(f"{Path(command[0]).name} failed: "
                                  f"{(done.stderr or done.stdout).strip()[-500:]}")


@contextmanager
def throwaway_cluster() -> Iterator[str]:
    """Start a fresh cluster on a free loopback port; yield its admin URL; stop and delete it."""
    binaries, user = find_binaries(), _server_user()
    with tempfile.TemporaryDirectory(prefix="sim-pg-") as folder:
        root = Path(folder)
        if user:
            shutil.chown(root, user=user)
        data, port = root / "data", free_port()
        _run([str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
              "-E", "UTF8", "--locale=C", "--no-sync"], user)
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
        _run([str(binaries / "pg_ctl"), "start", "-D", str(data), "-w", "-t", "60",
              "-l", str(root / "server.log"), "-o", options], user)
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        finally:
            _run([str(binaries / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w"], user)


@contextmanager
def admin_url() -> Iterator[str]:
    """The configured server if it answers, else a throwaway cluster for as long as needed."""
    configured = os.environ.get(ADMIN_URL_ENV, DEFAULT_ADMIN_URL)
    if answers(configured):
        yield configured
        return
    with throwaway_cluster() as url:
        yield url


@contextmanager
def database(admin: str, prefix: str = "sim_test") -> Iterator[str]:
    """A new, empty database on the server at ``admin``, dropped (connections and all) after."""
    name = f"{prefix}_{os.urandom(5).hex()}"
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(admin).set(database=name).render_as_string(hide_password=False)
    finally:
        from sim_pipeline.results.db import _engine

        _engine.cache_clear()
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()
