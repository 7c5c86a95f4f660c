"""A SparkSession for ``sim-pipeline spark``: Java checked first, executors on this Python."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sim_pipeline.core.errors import UserError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

NO_JAVA = ("Spark needs a Java runtime (17 or 21) and none was found: install one (Debian/Ubuntu: "
           "apt-get install openjdk-17-jre-headless) or set JAVA_HOME.")
NO_PYSPARK = ("Scoring on Spark needs pyspark: pip install 'sim-pipeline[spark]' "
              "(with -c constraints.txt).")


def java_problem() -> str | None:
    """The sentence to show when no Java runtime can start Spark, else None."""
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return None
    return None if shutil.which("java") else NO_JAVA


def spark_session(master: str | None = None, app_name: str = "sim-pipeline") -> SparkSession:
    """The active session, or a new one on ``master`` (spark-submit's own when None).

    With a local master the executors run this Python (its venv has pyarrow and the package)
    and Spark talks on 127.0.0.1 only; a real cluster keeps what spark-submit configured.
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
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    return builder.getOrCreate()
