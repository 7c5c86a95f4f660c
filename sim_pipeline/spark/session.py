"""A SparkSession for ``sim-pipeline spark``: Java checked first, executors on this Python."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from sim_pipeline.core.errors import UserError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

NO_JAVA = ("Spark needs a Java runtime (17 or 21) and none was found: install one (Debian/Ubuntu: "
           "apt-get install openjdk-17-jre-headless) or set JAVA_HOME.")
NO_PYSPARK = ("Scoring on Spark needs pyspark: pip install 'sim-pipeline[spark]' "
              "(with -c constraints.txt).")
# A local master's JVMs live for one command: a quick start beats peak speed. C1 only, one
# compiler thread and the serial collector cut the JVMs' start on a small machine by seconds
# (bench.spark: 47-49 s to 41-44 s on 2 cores); no web UI. Settings given to spark-submit
# (PYSPARK_SUBMIT_ARGS, --conf) come later on its command line and win.
QUICK_JVM = "-XX:TieredStopAtLevel=1 -XX:CICompilerCount=1 -XX:+UseSerialGC"
LOCAL_DEFAULTS = {"spark.ui.enabled": "false"}
JAVA_OPTIONS = {"driver": "spark.driver.extraJavaOptions",
                "executor": "spark.executor.extraJavaOptions"}
# the JVM's own notes on archives (one per signed jar skipped) would go to stdout
QUIET_ARCHIVES = "-Xlog:cds=off -Xlog:cds+dynamic=off"
GATEWAY_EXIT_SECONDS = 120  # writing the archive at exit takes seconds, not minutes
STALE_PART_SECONDS = 3600  # no run writes its archives for an hour
MIN_FREE_BYTES = 2 << 30  # the archives take ~270 MB: never fill a nearly full disk with them


@dataclass(frozen=True)
class ClassArchives:
    """Class-data archives (the JDK's AppCDS) for a local master's JVMs, one for the driver and
    one for the executors: the Spark and Scala classes they load, ready to map instead of
    parsed and verified at every start, which on two cores starts the first task about 4 s
    sooner (bench.spark). The first command on a machine makes them as its JVMs exit (named
    for this run, then renamed into place); later ones use them. A JVM that cannot use an
    archive (another Java, a changed classpath) starts as without one."""

    folder: Path
    token: str  # this run's name for the archives it makes
    roles: tuple[str, ...] = tuple(JAVA_OPTIONS)  # a local[N] master has no executor JVMs

    def path(self, role: str) -> Path:
        return self.folder / f"{role}.jsa"

    def making(self, role: str) -> bool:
        return not self.path(role).exists()

    def making_any(self) -> bool:
        return any(self.making(role) for role in self.roles)

    def java_option(self, role: str) -> str:
        if not self.making(role):
            return f"{QUIET_ARCHIVES} -XX:SharedArchiveFile={self.path(role)}"
        label = "{{EXECUTOR_ID}}" if role == "executor" else "0"  # Spark fills in the id
        return (f"{QUIET_ARCHIVES} -XX:ArchiveClassesAtExit="
                f"{self.folder / f'{role}.{self.token}.{label}.part'}")

    def keep(self) -> None:
        """Once the JVMs have exited: each role's archive made by this run into place (a JVM
        killed while writing one leaves it short: the largest is kept), the rest removed, and
        pieces an interrupted run left more than an hour ago."""
        for part in self.folder.glob("*.part"):
            if time.time() - part.stat().st_mtime > STALE_PART_SECONDS:
                part.unlink(missing_ok=True)
        for role in self.roles:
            made = sorted(self.folder.glob(f"{role}.{self.token}.*.part"),
                          key=lambda part: part.stat().st_size)
            if made and made[-1].stat().st_size:
                os.replace(made.pop(), self.path(role))
            for part in made:
                part.unlink(missing_ok=True)


def class_archives(master: str, setting: str = "") -> ClassArchives | None:
    """The archives of a local ``master``'s JVMs, where this Java, pyspark and environment keep
    them: in ``setting`` (``Settings.jvm_archives``), else the user's cache folder. None for
    another master or when turned ``off``."""
    if not master.startswith("local"):
        return None
    if setting.lower() == "off":
        return None
    try:
        spark_version = version("pyspark")
    except PackageNotFoundError:
        return None  # spark_session says what to install
    java = java_binary()
    if java is None:
        return None  # spark_session says what to install
    java = java.resolve()
    runtime = "|".join([str(java), str(java.stat().st_mtime_ns), spark_version, sys.prefix])
    base = Path(setting).expanduser() if setting else Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sim-pipeline" / "jvm"
    folder = base / hashlib.sha256(runtime.encode()).hexdigest()[:16]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
    except OSError:
        return None  # no archives beats no Spark
    roles = tuple(JAVA_OPTIONS) if master.startswith("local-cluster") else ("driver",)
    archives = ClassArchives(folder, secrets.token_hex(4), roles)
    return None if archives.making_any() and free < MIN_FREE_BYTES else archives


def java_binary() -> Path | None:
    """The Java that starts Spark: ``$JAVA_HOME/bin/java``, else the first on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return Path(home) / "bin" / "java"
    found = shutil.which("java")
    return Path(found) if found else None


def java_problem() -> str | None:
    """The sentence to show when no Java runtime can start Spark, else None."""
    return None if java_binary() else NO_JAVA


def spark_session(master: str | None = None, app_name: str = "sim-pipeline",
                  conf: Mapping[str, str] | None = None,
                  archives: ClassArchives | None = None) -> SparkSession:
    """The active session, or a new one on ``master`` (spark-submit's own when None), with
    ``conf`` on top.

    With a local master the executors run this Python (its venv has pyarrow and the package),
    Spark talks on 127.0.0.1 only and its JVMs start quickly (``LOCAL_DEFAULTS``, and
    ``archives`` to use or make: see ``stop_session``); a real cluster keeps what
    spark-submit configured.
    """
    problem = java_problem()
    if problem:
        raise UserError(problem)
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise UserError(NO_PYSPARK) from None
    builder = SparkSession.builder.appName(app_name).config("spark.python.worker.reuse", "true")
    if master:
        builder = builder.master(master)
    if master and master.startswith("local"):
        for key, value in {**LOCAL_DEFAULTS, **_local_java_options(archives)}.items():
            builder = builder.config(key, value)
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def _local_java_options(archives: ClassArchives | None) -> dict[str, str]:
    return {key: QUICK_JVM + (f" {archives.java_option(role)}"
                              if archives and role in archives.roles else "")
            for role, key in JAVA_OPTIONS.items()}


def stop_session(spark: SparkSession, archives: ClassArchives | None = None) -> None:
    """Stop the application. When its JVMs were making class archives, the driver's JVM is
    told to exit (its gateway's input closed) and waited for, since it writes its archive as
    it exits, and the archives are kept; the session cannot be used again then."""
    gateway = getattr(spark.sparkContext._gateway, "proc", None)  # noqa: SLF001 - its JVM
    spark.stop()
    if archives is None or not archives.making_any():
        return
    if gateway is None or gateway.stdin is None:
        return
    gateway.stdin.close()
    try:
        gateway.wait(GATEWAY_EXIT_SECONDS)
    except subprocess.TimeoutExpired:
        return  # its archive is left unfinished, and made again next time
    archives.keep()
