"""``s3://`` input and output for ``sim-pipeline spark``, with or without Hadoop's S3A.

Spark reads and writes S3 through Hadoop's S3A connector (``hadoop-aws``), which EMR and
Dataproc ship and a pip-installed pyspark lacks. With it on the classpath, ``s3://`` becomes
``s3a://``, pointed at the endpoint and keys of the settings when they name them. Without it, and
with a local master (whose executors share the driver's disk), the driver copies the input down
and the parquet output up through boto3, the object store's own client, so a laptop or one big
machine reads a lake with no Hadoop jars; a cluster without S3A is refused in one sentence.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from sim_pipeline.core.config import Settings
from sim_pipeline.core.errors import UserError
from sim_pipeline.core.store import S3Options, S3Store

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

NO_S3A = ("This Spark cluster has no S3A connector for {location}: add hadoop-aws to its "
          "classpath (spark-submit --packages org.apache.hadoop:hadoop-aws:<its Hadoop version>), "
          "or run with a local master, where sim-pipeline copies s3:// files itself.")


def is_s3(location: str) -> bool:
    return location.startswith("s3://")


def s3a(location: str) -> str:
    """``s3://`` as Hadoop's S3A connector names it; other locations unchanged."""
    return "s3a://" + location[len("s3://"):] if is_s3(location) else location


@contextmanager
def spark_paths(spark: SparkSession, settings: Settings, source: str,
                output: str) -> Iterator[tuple[str, str]]:
    """The paths Spark reads and writes for ``source`` and ``output``; an ``s3://`` output
    written to a local folder is uploaded when the block ends without an error."""
    remote = [location for location in (source, output) if is_s3(location)]
    if not remote:
        yield source, output
        return
    if has_s3a(spark):
        configure_s3a(spark, settings.s3)
        yield s3a(source), s3a(output)
        return
    if not spark.sparkContext.master.startswith("local"):
        raise UserError(NO_S3A.format(location=remote[0]))
    with tempfile.TemporaryDirectory(prefix="sim-pipeline-spark-") as folder:
        local_source = download(source, Path(folder) / "input", settings.s3) \
            if is_s3(source) else source
        local_output = str(Path(folder) / "output" / _name(output)) if is_s3(output) else output
        yield local_source, local_output
        if is_s3(output):
            upload(Path(local_output), output, settings.s3)


def has_s3a(spark: SparkSession) -> bool:
    """Whether the driver's Hadoop resolves ``s3a://`` to a file system class."""
    from py4j.protocol import Py4JError

    jvm = spark.sparkContext._jvm  # noqa: SLF001 - the one way to ask Hadoop
    try:
        jvm.org.apache.hadoop.fs.FileSystem.getFileSystemClass(
            "s3a", spark.sparkContext._jsc.hadoopConfiguration())  # noqa: SLF001
    except Py4JError:
        return False
    return True


def configure_s3a(spark: SparkSession, options: S3Options | None) -> None:
    """Point S3A at the store's endpoint and keys, when the settings name them (else S3A keeps
    its own chain: instance roles, ``AWS_*`` variables)."""
    if options is None:
        return
    conf = spark.sparkContext._jsc.hadoopConfiguration()  # noqa: SLF001
    for key, value in (("fs.s3a.endpoint", options.endpoint_url),
                       ("fs.s3a.endpoint.region", options.region_name),
                       ("fs.s3a.access.key", options.aws_access_key_id),
                       ("fs.s3a.secret.key", options.aws_secret_access_key),
                       ("fs.s3a.session.token", options.aws_session_token)):
        if value:
            conf.set(key, value)
    if options.endpoint_url:  # S3-compatible servers (MinIO, SeaweedFS) want path-style URLs
        conf.set("fs.s3a.path.style.access", "true")


def _split(location: str) -> tuple[str, str]:
    parsed = urlparse(location)
    if not parsed.netloc:
        raise UserError(f"{location} names no bucket (use s3://bucket/key).")
    return parsed.netloc, parsed.path.lstrip("/")


def _name(location: str) -> str:
    return Path(urlparse(location).path.rstrip("/")).name or "data"


def _objects(store: S3Store, key: str) -> list[str]:
    """The object ``key`` itself, else every object under the folder ``key/``."""
    folder = key.rstrip("/") + "/"
    found = [k for k in store.list_keys(key.rstrip("/")) if k == key or k.startswith(folder)]
    return [key] if key in found else found


def download(location: str, folder: Path, options: S3Options | None) -> str:
    """Copy an S3 object, or every object under an S3 folder, into ``folder``; the local path
    keeps the location's name (and so its suffix: .csv, .tsv, parquet)."""
    bucket, key = _split(location)
    store = S3Store(bucket, "", options)
    objects = _objects(store, key)
    if not objects:
        raise UserError(f"Input {location} does not exist.")
    target = folder / _name(location)
    for name in objects:
        local = target if name == key else target / name[len(key.rstrip("/")) + 1:]
        local.parent.mkdir(parents=True, exist_ok=True)
        store.client.download_file(bucket, name, str(local))
    return str(target)


def upload(folder: Path, location: str, options: S3Options | None) -> None:
    """Replace what is under ``location/`` with the files of ``folder`` (Spark's parquet
    output), as ``mode("overwrite")`` does; the files go up before the old ones are removed."""
    bucket, key = _split(location)
    store = S3Store(bucket, "", options)
    prefix = key.rstrip("/")
    stale = set(_objects(store, prefix)) - {prefix}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name.startswith(".") and path.name.endswith(".crc"):
            continue  # Hadoop's local checksums, meaningless on S3
        name = f"{prefix}/{path.relative_to(folder).as_posix()}"
        store.client.upload_file(str(path), bucket, name)
        stale.discard(name)
    for name in sorted(stale):
        store.delete(name)
