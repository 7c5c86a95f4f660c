"""``sim-pipeline results ...`` on a real PostgreSQL (and SQLite): what a person sees and gets."""

from __future__ import annotations

import csv
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from sim_pipeline import cli
from sim_pipeline.core.config import Settings
from sim_pipeline.results.db import ResultsDB, scoring_runs
from sim_pipeline.results.query import stage_times
from tests.conftest import ImageServer, Route, make_image
from tests.pairs import Case, mixed_cases, read_csv, serve_good_images, write_cases
from tests.test_results_storage import chunk_rows
from tests.test_score_cli import score

RUN = "cli-results"


@dataclass(frozen=True)
class Scored:
    source: Path
    output: Path
    settings: Settings
    cases: list[Case]


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path,
           image_server: ImageServer, pg_url: str) -> Scored:
    """One CLI run into PostgreSQL, in 3 chunks, with most of the error codes there are."""
    folder = tmp_path_factory.mktemp("results-cli")
    cases = [c for c in mixed_cases(image_server, prefix="results-cli")
             if c.expected_error != "timeout"]
    source = write_cases(folder / "pairs.csv", cases)
    settings = Settings(model=str(tiny_model), store=str(folder / "store"), database_url=pg_url,
                        device="cpu", precision="fp32", batch_size=8, fetch_timeout=10,
                        fetch_concurrency=8, allow_hosts=image_server.allow_hosts)
    assert score(source, settings, "--run-id", RUN, "--chunk-size", "20") == 0
    return Scored(source, folder / "pairs_scored.csv", settings, cases)


def results(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = cli.main(["results", *args])
    out, err = capsys.readouterr()
    return status, out, err


def table(out: str) -> list[list[str]]:
    """A printed table back into cells (cells are never empty and never hold two spaces)."""
    return [re.split(r" {2,}", line.strip()) for line in out.strip("\n").splitlines()]


def age_run(url: str, run_id: str, by: timedelta, finished: bool = True) -> None:
    then = datetime.now(UTC) - by
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(scoring_runs.update().where(scoring_runs.c.run_id == run_id).values(
            started_at=then - timedelta(minutes=3), updated_at=then,
            finished_at=then if finished else None))
    engine.dispose()


def test_runs_lists_runs_with_counts_and_a_status_that_tells_the_dead_from_the_live(
        scored: Scored, pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    db = ResultsDB(pg_url)
    stale, failed = f"stale-{uuid.uuid4().hex[:6]}", f"failed-{uuid.uuid4().hex[:6]}"
    for run_id in (stale, failed):
        db.start_run(run_id, "/data/nightly.csv", "openai/clip-vit-base-patch32", 10)
        db.upsert_scores(chunk_rows(run_id, 0, size=10))
    age_run(pg_url, stale, timedelta(hours=2), finished=False)  # killed: no heartbeat since
    db.finish_run(failed, "failed", failure="The image store went away: rerun it.")

    status, out, err = results(capsys, "runs", "--database-url", pg_url, "--limit", "100")
    assert status == 0 and err == ""
    rows = table(out)
    assert rows[0] == ["RUN", "SOURCE", "MODEL", "STARTED (UTC)", "DURATION", "ROWS", "OK",
                       "ERRORS", "STATUS"]
    by_run = {row[0]: row for row in rows[1:]}
    expected_errors = sum(1 for c in scored.cases if c.expected_error)
    assert by_run[RUN][1] == "pairs.csv" and by_run[RUN][-1] == "succeeded"
    assert by_run[RUN][5:8] == [str(len(scored.cases)), str(len(scored.cases) - expected_errors),
                                str(expected_errors)]
    assert by_run[stale][2] == "openai/clip-vit-base-patch32"
    assert (by_run[stale][-1], by_run[stale][4]) == ("stale", "3 min 00 s")
    assert by_run[failed][5:] == ["10", "8", "2", "failed"]

    status, out, _ = results(capsys, "runs", "--database-url", pg_url, "--limit", "100",
                             "--stale-after", "3h")
    assert {row[0]: row for row in table(out)[1:]}[stale][-1] == "running"


def test_show_prints_the_run_and_its_first_rows(
        scored: Scored, pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = results(capsys, "show", RUN, "--database-url", pg_url, "--limit", "5")
    assert status == 0 and err == ""
    head, rows = out.split("\n\n", 1)
    assert f"run       {RUN}" in head and "status    succeeded" in head
    assert "http_404 1" in head and "% scored" in head
    lines = table(rows)
    assert lines[0] == ["ROW", "SIMILARITY", "ERROR", "IMAGE URL", "CAPTION"]
    assert [line[0] for line in lines[1:6]] == ["0", "1", "2", "3", "4"]
    assert re.fullmatch(r"0\.\d{4}", lines[1][1])
    assert f"showing 5 of {len(scored.cases)} rows" in out

    status, out, _ = results(capsys, "show", RUN, "--database-url", pg_url, "--errors",
                             "--limit", "100")
    errors = [line for line in table(out.split("\n\n", 1)[1])[1:]]
    assert status == 0
    assert [row[2] for row in errors] == [c.expected_error for c in scored.cases
                                          if c.expected_error]


def test_an_unknown_run_is_one_sentence_and_exit_status_2(
        pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["show", "no-such-run"], ["export", "no-such-run", "-o", "x.csv"],
                    ["report", "no-such-run", "-o", "x.html"]):
        status, out, err = results(capsys, *command, "--database-url", pg_url)
        assert (status, out) == (2, "")
        assert "'no-such-run' is not in the results database" in err
        assert len(err.strip().splitlines()) == 1


def test_export_is_the_cli_scored_csv_byte_for_byte(
        scored: Scored, pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exported = tmp_path / "exported.csv"
    status, out, err = results(capsys, "export", RUN, "-o", str(exported),
                               "--database-url", pg_url)
    assert status == 0 and err == ""
    assert out.strip() == f"wrote {len(scored.cases)} rows of run {RUN} to {exported}"
    assert exported.read_bytes() == scored.output.read_bytes()


def test_export_of_a_tsv_with_odd_rows_matches_too(
        tmp_path: Path, settings: Settings, image_server: ImageServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    urls = serve_good_images(image_server, 3, prefix="export-tsv")
    source = tmp_path / "odd.tsv"
    with source.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["url", "caption", "note"])
        writer.writerow([urls[0], "ünïcödé, \"quoted\"\nand a newline", "tab\there"])
        writer.writerow([urls[1], "too many fields", "x", "extra", "more"])
        writer.writerow([urls[2]])  # too few: padded
        writer.writerow(["", "no url", ""])
    assert score(source, settings, "--run-id", "odd") == 0
    exported = tmp_path / "exported.tsv"
    status, _, _ = results(capsys, "export", "odd", "-o", str(exported),
                           "--database-url", settings.database_url)
    assert status == 0
    assert exported.read_bytes() == (tmp_path / "odd_scored.tsv").read_bytes()


def test_export_to_parquet_has_the_same_columns_and_values(
        scored: Scored, pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow.parquet as pq

    exported = tmp_path / "scores.parquet"
    status, _, _ = results(capsys, "export", RUN, "-o", str(exported), "--database-url", pg_url)
    assert status == 0
    data = pq.read_table(exported)
    expected = read_csv(scored.output)
    assert data.column_names == expected[0]
    assert str(data.schema.field("similarity").type) == "double"
    for got, want in zip(data.to_pylist(), expected[1:], strict=True):
        similarity = "" if got["similarity"] is None else f"{got['similarity']:.4f}"
        assert [*(got[c] for c in expected[0][:-2]), similarity, got["error"] or ""] == want


def test_query_finds_the_newest_scores_of_a_url_or_a_caption(
        scored: Scored, pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    good = next(c for c in scored.cases if c.expected_error is None)
    status, out, _ = results(capsys, "query", "--url", f"  {good.url} ", "--database-url",
                             pg_url)
    assert status == 0
    rows = table(out)
    assert rows[0] == ["SIMILARITY", "ERROR", "MODEL", "RUN", "SCORED (UTC)", "CAPTION"]
    assert good.caption in [row[-1] for row in rows[1:]]
    assert all(row[3] == RUN for row in rows[1:])

    status, out, _ = results(capsys, "query", "--caption", good.caption, "--database-url",
                             pg_url)
    assert status == 0 and good.url in out and re.search(r"\b0\.\d{4}\b", out)

    status, out, err = results(capsys, "query", "--url", "http://nowhere.test/x.jpg",
                               "--database-url", pg_url)
    assert (status, out) == (1, "") and "no scores for that URL" in err


def test_prune_is_a_dry_run_unless_told_yes(
        pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    db = ResultsDB(pg_url)
    old = f"old-{uuid.uuid4().hex[:6]}"
    db.start_run(old, "old.csv", "m", 10)
    db.upsert_scores(chunk_rows(old, 0, size=10))
    db.record_stage(old, "plan", -1, 0.5)
    db.finish_run(old, "succeeded")
    age_run(pg_url, old, timedelta(days=100))

    status, out, _ = results(capsys, "prune", "--older-than", "90d", "--database-url", pg_url)
    assert status == 0
    listing, summary = out.split("\n\n")
    listed = {row[0]: row for row in table(listing)[1:]}
    assert (listed[old][1], listed[old][3]) == ("succeeded", "10")
    assert summary.startswith("dry run: would delete") and "add --yes" in summary
    assert _count(pg_url, old) == (1, 10, 1)

    status, out, _ = results(capsys, "prune", "--older-than", "90d", "--yes",
                             "--database-url", pg_url)
    assert status == 0 and "deleted" in out and _count(pg_url, old) == (0, 0, 0)
    status, out, _ = results(capsys, "prune", "--older-than", "90d", "--yes",
                             "--database-url", pg_url)
    assert status == 0 and "nothing to delete" in out


def _count(url: str, run_id: str) -> tuple[int, int, int]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        counts = tuple(conn.execute(sa.text(
            f"SELECT count(*) FROM {table} WHERE run_id = :run_id"), {"run_id": run_id}
        ).scalar_one() for table in ("scoring_runs", "similarity_scores", "stage_timings"))
    engine.dispose()
    return counts  # type: ignore[return-value]


def test_a_bad_duration_is_a_usage_error(pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["results", "prune", "--older-than", "ninety days", "--database-url", pg_url])
    assert stopped.value.code == 2
    assert "is not a duration" in capsys.readouterr().err


def test_the_cli_run_recorded_its_time_per_stage(scored: Scored, pg_url: str) -> None:
    found = {t.stage: t.chunks for t in stage_times(ResultsDB(pg_url), RUN)}
    assert found == {"plan": 0, "fetch-images": 3, "embed-images": 3, "embed-texts": 3,
                     "join-score": 3, "finalize": 0}


def test_the_staged_runner_keeps_the_same_record(
        tmp_path: Path, settings: Settings, image_server: ImageServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    """What Airflow tasks and pods run, one stage per call: timings, columns, export."""
    urls = serve_good_images(image_server, 4, prefix="staged")
    source = write_cases(tmp_path / "staged.csv", [Case(u, f"caption {i}", None)
                                                   for i, u in enumerate(urls)])
    flags = ["--run-id", "staged", "--chunk-size", "2", "--model", settings.model, "--store",
             settings.store, "--database-url", settings.database_url, "--device", "cpu",
             "--precision", settings.precision, "--allow-hosts", settings.allow_hosts]
    assert cli.main(["stage", "plan", "--input", str(source), *flags]) == 0
    for stage in ("fetch-images", "embed-images", "embed-texts", "join-score"):
        for chunk in ("0", "1"):
            assert cli.main(["stage", stage, "--chunk", chunk, *flags]) == 0
    assert cli.main(["stage", "finalize", *flags]) == 0
    found = {t.stage: t.chunks for t in stage_times(ResultsDB(settings.database_url), "staged")}
    assert found == {"plan": 0, "fetch-images": 2, "embed-images": 2, "embed-texts": 2,
                     "join-score": 2, "finalize": 0}
    status, _, _ = results(capsys, "export", "staged", "-o", str(tmp_path / "export.csv"),
                           "--database-url", settings.database_url)
    assert status == 0
    assert (tmp_path / "export.csv").read_bytes() == (tmp_path / "staged_scored.csv").read_bytes()


def test_report_is_one_self_contained_page(
        scored: Scored, pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "report.html"
    status, out, _ = results(capsys, "report", RUN, "-o", str(page), "--database-url", pg_url,
                             "--store", scored.settings.store)
    assert status == 0 and str(page) in out
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!doctype html>") and "<script" not in text
    assert "<svg" in text and text.count("<rect") >= 2  # the histogram
    scored_share = sum(1 for c in scored.cases if not c.expected_error) / len(scored.cases)
    assert f"{scored_share:.1%}" in text
    for code in {c.expected_error for c in scored.cases if c.expected_error}:
        assert f"<code>{code}</code>" in text
    for stage in ("plan", "fetch-images", "embed-images", "embed-texts", "join-score"):
        assert f"<td>{stage}</td>" in text
    assert "<td>127.0.0.1</td>" in text  # the fetcher recorded each URL's fetch time


def test_report_ranks_hosts_by_the_fetch_times_the_fetcher_recorded(
        tmp_path: Path, settings: Settings, image_server: ImageServer) -> None:
    slow = image_server.add("/hosts/slow.jpg", Route(body=make_image(900), delay=0.4))
    image_server.add("/hosts/fast.jpg", Route(body=make_image(901)))
    fast = f"http://localhost:{image_server.port}/hosts/fast.jpg"
    source = write_cases(tmp_path / "pairs.csv", [Case(slow, "slow", None),
                                                  Case(fast, "fast", None)])
    both_hosts = f"{image_server.allow_hosts},localhost:{image_server.port}"
    assert score(source, settings.replace(allow_hosts=both_hosts)) == 0
    text = (tmp_path / "pairs_scored_report.html").read_text(encoding="utf-8")
    hosts = re.findall(r'<tr><td>([^<]+)</td><td class="n">1</td><td class="n">([0-9.]+) s</td>',
                       text)
    assert [host for host, _ in hosts] == ["127.0.0.1", "localhost"]
    assert float(hosts[0][1]) >= 0.4 > float(hosts[1][1])


def test_the_database_password_is_never_printed(
        scored: Scored, pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with_password = pg_url.replace("postgres@", "postgres:s3cret-pw@")  # trust auth ignores it
    for command in (["runs"], ["show", RUN], ["show", "no-such-run"], ["query", "--url", "x"]):
        _, out, err = results(capsys, *command, "--database-url", with_password)
        assert "s3cret-pw" not in out + err
    status, out, err = results(capsys, "runs", "--database-url",
                               "postgresql://scorer:s3cret-pw@127.0.0.1:9/none")
    assert status == 2 and "Cannot use the results database" in err
    assert "s3cret-pw" not in out + err and "***" in err


def test_runs_on_an_empty_database_says_so(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = results(capsys, "runs", "--database-url",
                             f"sqlite:///{tmp_path / 'empty.db'}")
    assert status == 0 and out.startswith("no runs yet in sqlite:///")


def test_show_prints_a_failed_runs_sentence_and_a_rerun_that_succeeds_clears_it(
        pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    db = ResultsDB(pg_url)
    run_id, sentence = f"failed-{uuid.uuid4().hex[:6]}", "The image store went away: rerun it."
    db.start_run(run_id, "/data/nightly.csv", "openai/clip-vit-base-patch32", 10)
    db.finish_run(run_id, "failed", failure=sentence)
    status, out, _ = results(capsys, "show", run_id, "--database-url", pg_url)
    assert status == 0 and f"failure   {sentence}" in out.split("\n\n", 1)[0]
    db.start_run(run_id, "/data/nightly.csv", "openai/clip-vit-base-patch32", 10)
    db.finish_run(run_id, "succeeded")
    status, out, _ = results(capsys, "show", run_id, "--database-url", pg_url)
    assert status == 0 and "failure" not in out
