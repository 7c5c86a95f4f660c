"""Scoring on a real Spark cluster: ``local-cluster[2,1,1024]`` starts two executor JVMs, each
with its own Python workers, on 127.0.0.1. One cluster serves the whole module.

The store is S3 (SeaweedFS), reached through ``Settings.s3`` alone: the executors have no AWS
variables, so the settings must reach them as data.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa

from sim_pipeline.core.config import Settings
from sim_pipeline.core.errors import UserError
from sim_pipeline.core.store import S3Options, open_store, read_json
from sim_pipeline.runners.pipeline import score_csv
from sim_pipeline.spark.executor import MODEL_LOADS_PREFIX
from sim_pipeline.spark.job import run_spark_job
from sim_pipeline.spark.session import NO_JAVA, QUICK_JVM, java_problem, spark_session
from tests.conftest import ImageServer, Route, make_image
from tests.pairs import mixed_cases, read_csv, write_cases
from tests.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedFS

pytest_plugins = ["tests.plugin_s3"]
MASTER = "local-cluster[2,1,1024]"
BATCH_ROWS = 8  # Arrow batch size: each Python worker scores several batches per job
LIMITS = {"max_image_bytes": 200_000, "max_pixels": 1_000_000}  # small, for too_large & co.


@pytest.fixture(scope="module")
def spark() -> Iterator[object]:
    problem = java_problem()
    if problem:
        pytest.fail(problem, pytrace=False)
    for name, value in (("SPARK_LOCAL_IP", "127.0.0.1"), ("PYSPARK_PYTHON", sys.executable),
                        ("PYSPARK_DRIVER_PYTHON", sys.executable)):
        os.environ[name] = value
    session = spark_session(MASTER, "sim-pipeline-tests", {
        "spark.driver.host": "127.0.0.1",
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(BATCH_ROWS)})
    try:
        yield session
    finally:
        session.stop()


@pytest.fixture(scope="module", autouse=True)
def refusing_port(image_server: ImageServer) -> Iterator[int]:
    """A loopback port held bound but never listening, so a connection to it is refused for
    the whole module: a port merely closed could be taken meanwhile by one of Spark's own
    servers (which answer 404)."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        before, image_server.closed_port = image_server.closed_port, held.getsockname()[1]
        try:
            yield image_server.closed_port
        finally:
            image_server.closed_port = before


def error_file(server: ImageServer, path: Path, prefix: str) -> tuple[Path, set[str]]:
    """Every error class the pipeline has, in one CSV: the shared mixed cases plus the rows only
    a raw file can hold (more fields than the header, bytes that are not UTF-8)."""
    cases = mixed_cases(server, prefix=prefix)
    write_cases(path, cases)
    big = make_image(seed=11, size=(900, 900))
    extra = {
        "too_large": server.add(f"/{prefix}/big.jpg", Route(body=big + b"\0" * 300_000)),
        "robots_disallowed": server.add(f"/{prefix}/noai.jpg", Route(
            body=make_image(seed=12), headers={"X-Robots-Tag": "noai"})),
        "too_many_pixels": server.add(f"/{prefix}/huge.png", Route(
            body=make_image(seed=13, fmt="PNG", size=(1200, 1000)), content_type="image/png")),
    }
    good = cases[0].url
    with path.open("ab") as handle:  # CRLF, as csv.writer ended the rows above
        for code, url in extra.items():
            handle.write(f"x-{code},{url},caption for {code},n\r\n".encode())
        handle.write(f"x-malformed,{good},extra fields,n,one too many\r\n".encode())
        handle.write(f"x-encoding,{good},caf\xe9 bytes\xff,n\r\n".encode("latin-1"))
        handle.write(b"x-credentials,http://user:pw@127.0.0.1/x.jpg,creds,n\r\n")
        handle.write(b"x-short,http://127.0.0.1/short.jpg\r\n")
    expected = {c.expected_error for c in cases if c.expected_error} | set(extra) | {
        "malformed_row", "invalid_encoding", "credentials_in_url"}
    return path, expected


def spark_settings(settings: Settings, seaweedfs: SeaweedFS, prefix: str,
                   **changes: object) -> Settings:
    s3 = S3Options(endpoint_url=seaweedfs.endpoint, region_name="us-east-1",
                   aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
    return settings.replace(store=f"s3://{seaweedfs.bucket}/{prefix}", s3=s3,
                            **LIMITS, **changes)


def cli_output(settings: Settings, source: Path, tmp_path: Path) -> list[list[str]]:
    output = tmp_path / "cli_scored.csv"
    score_csv(source, settings.replace(**LIMITS, store=str(tmp_path / "cli-store")), output,
              progress=False)
    return read_csv(output)


def model_load_notes(settings: Settings, run_id: str) -> list[dict]:
    store = open_store(settings.store, settings.s3)
    return [read_json(store, key) for key in store.list_keys()
            if key.startswith(f"{MODEL_LOADS_PREFIX}/{run_id}/")]


def chunk_count(settings: Settings, run_id: str) -> int:
    store = open_store(settings.store, settings.s3)
    return sum(1 for key in store.list_keys()
               if key.startswith(f"runs/{run_id}/") and key.endswith("/rows.arrow"))


def test_spark_output_is_the_cli_output_on_every_error_class(
        spark, settings: Settings, image_server: ImageServer, seaweedfs: SeaweedFS,
        tmp_path: Path) -> None:
    source, expected = error_file(image_server, tmp_path / "pairs.csv", "spark-parity")
    cli = cli_output(settings, source, tmp_path)
    on_spark = spark_settings(settings, seaweedfs, "parity")
    output = tmp_path / "spark_scored.csv"

    summary = run_spark_job(spark, str(source), str(output), on_spark, run_id="parity")

    assert read_csv(output) == cli
    assert output.read_bytes() == (tmp_path / "cli_scored.csv").read_bytes()
    codes = {row[-1] for row in cli[1:] if row[-1]}
    assert expected <= codes, expected - codes
    assert summary.rows == len(cli) - 1
    assert summary.scored == sum(1 for row in cli[1:] if row[-2])
    # The model loads once per Python worker, however many batches that worker scores.
    notes = model_load_notes(on_spark, "parity")
    loaded = [note for note in notes if note["tower_loads"]]
    assert len(loaded) >= 2, notes  # both executors scored
    assert all(note["tower_loads"] == 2 for note in loaded), notes  # image + text tower, once
    assert chunk_count(on_spark, "parity") > len(notes)  # workers reused across batches
    assert sum(1 for note in notes for batch in note["batches"] if batch["rows"]) == \
        chunk_count(on_spark, "parity")  # each batch noted, with its timings


def test_parquet_output_keeps_column_types_and_nulls(
        spark, settings: Settings, image_server: ImageServer, seaweedfs: SeaweedFS,
        tmp_path: Path) -> None:
    from pyspark.sql import functions as F

    source, _ = error_file(image_server, tmp_path / "pairs.csv", "spark-parity")
    cli = cli_output(settings, source, tmp_path)
    output = tmp_path / "scored.parquet"
    run_spark_job(spark, str(source), str(output),  # the parity test's store: caches warm
                  spark_settings(settings, seaweedfs, "parity"), run_id="parquet")

    scored = spark.read.parquet(str(output))
    assert scored.columns == cli[0]
    assert dict(scored.dtypes)["similarity"] == "double"
    rows = scored.orderBy(F.col("id")).collect()  # ids are unique in the file
    by_id = {row[0]: row for row in cli[1:]}
    for row in rows:
        similarity = "" if row["similarity"] is None else f"{row['similarity']:.4f}"
        assert (similarity, row["error"] or "") == tuple(by_id[row["id"]][-2:])
        assert (row["similarity"] is None) != (row["error"] is None)


def running_python_workers() -> list[psutil.Process]:
    """This test session's executor Python workers: ``pyspark.daemon`` children of a daemon."""
    workers = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "pyspark.daemon" in " ".join(child.cmdline()) and \
                    "pyspark.daemon" in " ".join(child.parent().cmdline()):
                workers.append(child)
        except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
            continue
    return workers


def test_killed_python_worker_is_retried_without_duplicate_rows(
        spark, settings: Settings, image_server: ImageServer, seaweedfs: SeaweedFS,
        pg_url: str, tmp_path: Path) -> None:
    source, _ = error_file(image_server, tmp_path / "pairs.csv", "spark-kill")
    slow = image_server.add("/spark-kill/slow-but-fine.jpg",
                            Route(body=make_image(seed=21), delay=2.0))
    with source.open("a") as handle:
        handle.write(f"x-slow,{slow},a slow image,n\r\n")
    cli = cli_output(settings, source, tmp_path)
    on_spark = spark_settings(settings, seaweedfs, "kill", database_url=pg_url)
    output = tmp_path / "spark_scored.csv"
    outcome: dict[str, object] = {}

    def job() -> None:
        try:
            outcome["summary"] = run_spark_job(spark, str(source), str(output), on_spark,
                                               record=True, run_id="spark-kill")
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = error

    thread = threading.Thread(target=job)
    thread.start()
    deadline = time.monotonic() + 240
    while image_server.requests["/spark-kill/slow-but-fine.jpg"] == 0:
        assert time.monotonic() < deadline and thread.is_alive(), outcome
        time.sleep(0.05)
    killed = running_python_workers()
    assert killed, "no executor Python worker was running mid-job"
    for worker in killed:
        os.kill(worker.pid, signal.SIGKILL)
    thread.join(300)

    assert "error" not in outcome, outcome
    for worker in killed:
        assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE
    assert image_server.requests["/spark-kill/slow-but-fine.jpg"] >= 2  # the task ran again
    assert read_csv(output) == cli
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT row_number, similarity, error FROM similarity_scores "
            "WHERE run_id = 'spark-kill' ORDER BY row_number")).all()
        run = conn.execute(sa.text(
            "SELECT status, rows_total, rows_ok, rows_error FROM scoring_runs "
            "WHERE run_id = 'spark-kill'")).one()
    engine.dispose()
    assert [r[0] for r in rows] == list(range(len(cli) - 1))  # each row once
    assert [("" if r[1] is None else f"{r[1]:.4f}", r[2] or "") for r in rows] == \
        [tuple(row[-2:]) for row in cli[1:]]
    scored = sum(1 for row in cli[1:] if row[-2])
    assert tuple(run) == ("succeeded", len(cli) - 1, scored, len(cli) - 1 - scored)
    notes = model_load_notes(on_spark, "spark-kill")
    assert notes and all(note["tower_loads"] in (0, 2) for note in notes), notes
    assert {note["pid"] for note in notes}.isdisjoint(w.pid for w in killed)


def s3_client(seaweedfs: SeaweedFS):  # noqa: ANN201 - a boto3 client
    import boto3

    return boto3.session.Session().client(
        "s3", endpoint_url=seaweedfs.endpoint, region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)


def test_s3_input_and_output_without_hadoop_s3a(
        spark, settings: Settings, image_server: ImageServer, seaweedfs: SeaweedFS,
        tmp_path: Path) -> None:
    """pip's pyspark has no S3A connector: with a local master the command copies an s3://
    input down and a parquet output up through the store's own S3 client (and its settings)."""
    from sim_pipeline.spark.s3_paths import has_s3a

    assert not has_s3a(spark)  # otherwise this test would not test the copying
    source, _ = error_file(image_server, tmp_path / "pairs.csv", "spark-parity")
    cli = cli_output(settings, source, tmp_path)
    client = s3_client(seaweedfs)
    client.upload_file(str(source), seaweedfs.bucket, "lake/in/pairs.csv")
    client.put_object(Bucket=seaweedfs.bucket, Key="lake/out/scored/part-stale.parquet",
                      Body=b"left by an earlier run")
    on_spark = spark_settings(settings, seaweedfs, "parity")
    lake = f"s3://{seaweedfs.bucket}/lake"

    summary = run_spark_job(spark, f"{lake}/in/pairs.csv", f"{lake}/out/scored", on_spark,
                            run_id="s3-in")

    scored = s3_parquet(client, seaweedfs.bucket, "lake/out/scored/", tmp_path / "down")
    assert summary.rows == scored.num_rows == len(cli) - 1
    assert scored.column_names == cli[0]
    by_id = {row[0]: tuple(row[-2:]) for row in cli[1:]}
    for row in scored.to_pylist():
        similarity = "" if row["similarity"] is None else f"{row['similarity']:.4f}"
        assert (similarity, row["error"] or "") == by_id[row["id"]]

    # A folder of parquet files on S3 as the input, scored into the CLI's CSV here.
    import pyarrow.parquet as pq

    # (without Spark's schema in the file's metadata, which still names the dropped columns)
    pairs = scored.drop_columns(["similarity", "error"]).replace_schema_metadata(None)
    for part in range(2):
        local = tmp_path / f"part-{part}.parquet"
        pq.write_table(pairs.slice(part * 20, 20 if part == 0 else None), local)
        client.upload_file(str(local), seaweedfs.bucket, f"lake/in/pairs.parquet/{local.name}")
    output = tmp_path / "from_parquet.csv"
    again = run_spark_job(spark, f"{lake}/in/pairs.parquet", str(output), on_spark,
                          run_id="s3-parquet")
    assert again.rows == len(cli) - 1
    raw_only = {"x-malformed", "x-encoding", "x-short"}  # what only a raw CSV holds
    # Spark reads the larger file first: the same rows, in another order.
    assert sorted(row for row in read_csv(output)[1:] if row[0] not in raw_only) == \
        sorted(row for row in cli[1:] if row[0] not in raw_only)


def s3_parquet(client, bucket: str, prefix: str, folder: Path):  # noqa: ANN001, ANN201
    """Every parquet file under ``prefix``, downloaded and read as one table, in name order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    keys = sorted(item["Key"] for item in client.list_objects_v2(
        Bucket=bucket, Prefix=prefix)["Contents"])
    assert "lake/out/scored/part-stale.parquet" not in keys  # overwritten, as Spark does
    tables = []
    for i, key in enumerate(k for k in keys if k.endswith(".parquet")):
        client.download_file(bucket, key, str(folder / f"{i}.parquet"))
        tables.append(pq.read_table(folder / f"{i}.parquet"))
    return pa.concat_tables(tables)


def test_an_s3_input_that_is_not_there_is_named(
        spark, settings: Settings, seaweedfs: SeaweedFS, tmp_path: Path) -> None:
    missing = f"s3://{seaweedfs.bucket}/lake/none/pairs.csv"
    with pytest.raises(UserError, match=f"^Input {missing} does not exist.$"):
        run_spark_job(spark, missing, str(tmp_path / "out.parquet"),
                      spark_settings(settings, seaweedfs, "parity"))


def test_a_missing_or_non_text_column_is_refused_before_any_job(
        spark, settings: Settings) -> None:
    from sim_pipeline.spark import score_frame

    frame = spark.createDataFrame([("http://127.0.0.1/x.jpg", 1)], "url string, caption int")
    jobs_before = len(spark.sparkContext.statusTracker().getJobIdsForGroup())
    with pytest.raises(UserError, match=r"^No url column found \(looked for link;"):
        score_frame(frame, url_col="link", settings=settings)
    with pytest.raises(UserError, match=r"^Column 'caption' holds int values, not text;"):
        score_frame(frame, settings=settings)
    assert len(spark.sparkContext.statusTracker().getJobIdsForGroup()) == jobs_before


def test_a_model_that_cannot_be_scored_is_refused_by_the_executors_before_any_download(
        spark, settings: Settings, image_server: ImageServer, tmp_path: Path) -> None:
    """The executors check the model in the warm-up job, where it will load; the driver does
    not resolve it, and no image is requested."""
    from sim_pipeline.spark import score_frame
    from sim_pipeline.stages.embed.families import resolve_model

    folder = tmp_path / "a-bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    url = image_server.add("/spark-bad-model/a.jpg", Route(body=make_image(seed=5)))
    frame = spark.createDataFrame([(url, "a caption")], "url string, caption string")
    resolved_here = resolve_model.cache_info().misses
    with pytest.raises(UserError, match=rf"^The model '{folder}' is a bert checkpoint; "
                                        "sim-pipeline scores with the CLIP"):
        score_frame(frame, settings=settings.replace(model=str(folder)))
    assert resolve_model.cache_info().misses == resolved_here  # not on the driver
    assert image_server.requests["/spark-bad-model/a.jpg"] == 0


def test_a_local_clusters_jvms_start_with_the_quick_options(spark) -> None:
    """The driver and both executor JVMs run C1 only with the serial collector, and no web UI
    is served: a local master's JVMs live for one command."""
    java = [p for p in psutil.Process().children(recursive=True)
            if p.name().startswith("java")]
    executors = [p for p in java if "CoarseGrainedExecutorBackend" in " ".join(p.cmdline())]
    drivers = [p for p in java if "SparkSubmit" in " ".join(p.cmdline())]
    assert len(executors) == 2 and len(drivers) == 1, [p.cmdline() for p in java]
    for process in [*executors, *drivers]:
        assert set(QUICK_JVM.split()) <= set(process.cmdline()), process.cmdline()
    assert spark.sparkContext.uiWebUrl is None


def test_a_missing_java_runtime_is_named_in_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", "")
    assert java_problem() == NO_JAVA
    from sim_pipeline.spark.session import spark_session

    with pytest.raises(UserError, match="^Spark needs a Java runtime"):
        spark_session("local[1]")


def test_the_command_refuses_a_missing_input_before_starting_spark(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sim_pipeline.cli import main

    missing = tmp_path / "missing.csv"
    assert main(["spark", str(missing), str(tmp_path / "out.parquet")]) == 2
    assert capsys.readouterr().err == f"sim-pipeline: error: Input {missing} does not exist.\n"
    assert not (tmp_path / "out.parquet").exists()


def test_a_batch_is_scored_in_pieces_the_next_downloading_beside_the_towers(
        settings: Settings, image_server: ImageServer, tmp_path: Path) -> None:
    """A batch of more than FETCH_AHEAD_BATCHES forward passes goes in pieces, the next
    piece's images downloading while this one's embed: the rows are the CLI's, each image is
    fetched once. (The executor's code, run here in-process, without Spark.)"""
    import pandas as pd
    import torch

    from sim_pipeline.spark.executor import (
        FETCH_AHEAD_BATCHES,
        ROW_COLUMN,
        ScoringJob,
        score_batches,
    )

    cases = mixed_cases(image_server, prefix="ahead")
    source = write_cases(tmp_path / "pairs.csv", cases)
    cli = cli_output(settings, source, tmp_path)
    header, *rows = read_csv(source)
    frame = pd.DataFrame(rows, columns=header)
    frame[ROW_COLUMN] = range(len(rows))
    small = settings.replace(**LIMITS, batch_size=4, store=str(tmp_path / "ahead-store"))
    job = ScoringJob(small, tuple(header), "Image_URL", "Caption", chunk_run_id="ahead")
    good = {case.url.removeprefix(image_server.url("")) for case in cases
            if case.expected_error is None and case.url.startswith(image_server.url("/"))}
    before = {path: image_server.requests[path] for path in good}
    threads = torch.get_num_threads()
    try:
        (scored,) = list(score_batches(job, iter([frame])))
    finally:
        torch.set_num_threads(threads)  # the worker gives torch its task's cores

    similarity = ["" if pd.isna(value) else f"{value:.4f}" for value in scored["similarity"]]
    errors = ["" if pd.isna(value) else value for value in scored["error"]]
    assert [[*row, s, e] for row, s, e in zip(rows, similarity, errors, strict=True)] == cli[1:]
    assert {path: image_server.requests[path] - before[path] for path in good} == \
        dict.fromkeys(good, 1)
    piece = FETCH_AHEAD_BATCHES * small.batch_size
    assert chunk_count(small, "ahead") == -(-len(rows) // piece)
    (note,) = model_load_notes(small, "ahead")
    (batch,) = note["batches"]
    fetches = [s for s in batch["stages"] if s["stage"] == "fetch-images"]
    embeds = [s for s in batch["stages"] if s["stage"] == "embed-images"]
    assert len(fetches) == len(embeds) == chunk_count(small, "ahead")
    # the second piece's downloads started before the first piece's images were embedded
    assert fetches[1]["start"] < embeds[0]["start"] + embeds[0]["seconds"]


def test_the_command_makes_its_class_archives_once_then_starts_from_them(
        settings: Settings, image_server: ImageServer, tmp_path: Path) -> None:
    """The first ``sim-pipeline spark`` on a local master leaves one class-data archive for
    the driver's JVM and one for the executors', whole (no pieces left); the next run starts
    its JVMs from them and leaves them as they are, with the same output."""
    source = write_cases(tmp_path / "pairs.csv", mixed_cases(image_server, "archives")[:6])
    folder = tmp_path / "jvm"
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("SIM_PIPELINE_")}
    env.update(SIM_PIPELINE_JVM_ARCHIVES=str(folder), SIM_PIPELINE_MODEL=settings.model,
               SIM_PIPELINE_DEVICE="cpu", SIM_PIPELINE_PRECISION="fp32",
               SIM_PIPELINE_ALLOW_HOSTS=image_server.allow_hosts,
               SIM_PIPELINE_DATABASE_URL=f"sqlite:///{tmp_path / 'results.db'}",
               SPARK_LOCAL_IP="127.0.0.1")

    def run(name: str) -> list[list[str]]:
        output = tmp_path / f"{name}.csv"
        done = subprocess.run([sys.executable, "-m", "sim_pipeline.cli", "spark", str(source),
                               str(output), "--master", MASTER, "--store",
                               str(tmp_path / f"{name}-store")],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "cds" not in done.stdout + done.stderr  # the JVMs' notes on archives kept quiet
        return read_csv(output)

    first = run("first")
    made = {path.name: path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}
    assert set(made) == {"driver.jsa", "executor.jsa"}, made
    assert run("second") == first
    assert {path.name: path.stat().st_mtime_ns for path in folder.rglob("*")
            if path.is_file()} == made


def test_class_archives_keep_the_whole_archive_each_jvm_role_made(tmp_path: Path) -> None:
    """After the JVMs exit, each role's archive made by this run takes its place (of two
    executors' the larger: one killed while writing leaves its short); another run's pieces
    stay unless an hour old, and a role whose JVM wrote nothing makes one next time."""
    from sim_pipeline.spark.session import ClassArchives

    archives = ClassArchives(tmp_path, "run1")
    assert "-XX:ArchiveClassesAtExit=" in archives.java_option("executor")
    assert "{{EXECUTOR_ID}}" in archives.java_option("executor")
    (tmp_path / "executor.run1.0.part").write_bytes(b"x" * 10)
    (tmp_path / "executor.run1.1.part").write_bytes(b"x" * 30)
    (tmp_path / "driver.run1.0.part").write_bytes(b"")
    (tmp_path / "executor.run2.0.part").write_bytes(b"y")  # another run, writing now
    (tmp_path / "driver.run0.0.part").write_bytes(b"z")  # one that stopped long ago
    os.utime(tmp_path / "driver.run0.0.part", (time.time() - 7200, time.time() - 7200))

    archives.keep()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["executor.jsa", "executor.run2.0.part"]
    assert (tmp_path / "executor.jsa").read_bytes() == b"x" * 30
    assert archives.making("driver") and not archives.making("executor")
    assert archives.java_option("executor").endswith(
        f"-XX:SharedArchiveFile={tmp_path / 'executor.jsa'}")
