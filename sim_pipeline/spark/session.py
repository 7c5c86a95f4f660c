"""A SparkSession for ``sim-pipeline spark``: Java checked first, executors on this Python."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
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
LOCAL_DEFAULTS = {"spark.ui.enabled": "false", "spark.driver.extraJavaOptions": QUICK_JVM,
                  "spark.executor.extraJavaOptions": QUICK_JVM}


def java_problem() -> str | None:
    """The sentence to show when no Java runtime can start Spark, else None."""
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return None
    return None if shutil.which("java") else NO_JAVA


def spark_session(master: str | None = None, app_name: str = "sim-pipeline",
                  conf: Mapping[str, str] | None = None) -> SparkSession:
    """The active session, or a new one on ``master`` (spark-submit's own when None), with
    ``conf`` on top.

    With a local master the executors run this Python (its venv has pyarrow and the package),
    Spark talks on 127.0.0.1 only and its JVMs start quickly (``LOCAL_DEFAULTS``); a real
    cluster keeps what spark-submit configured.
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
        for key, value in LOCAL_DEFAULTS.items():
            builder = builder.config(key, value)
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    return builder.getOrCreate()
