"""``sim-pipeline results drift``: real runs scored end to end, on PostgreSQL and on SQLite.

One baseline run of 40 pairs (random-weight CLIP: meaningless scores, real stages), then runs that
should and should not alarm: the baseline against itself; a run over only the baseline's
top-scoring pairs; the same input a day later with half its URLs now failing; the baseline's pairs
scored by another checkpoint. Every run also scores the same five canary pairs. The expected
figures are computed here from the rows in the database with scipy and numpy directly.
"""

from __future__ import annotations

import csv
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from scipy import stats

from sim_pipeline import cli
from sim_pipeline.core.config import Settings
from sim_pipeline.core.errors import UserError
from sim_pipeline.devtools.random_model import build_random_clip
from sim_pipeline.results.db import ResultsDB
from sim_pipeline.results.drift import (
    Scores,
    ks_test,
    measure_drift,
    normalised_wasserstein,
    psi,
)
from sim_pipeline.runners.pipeline import score_csv
from tests.conftest import ImageServer, Route
from tests.pairs import serve_good_images

ROWS = 40


@dataclass(frozen=True)
class Runs:
    settings: Settings
    base: str
    top: str
    half_failing: str
    other_checkpoint: str
    folder: Path


def write_csv(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption"])
        writer.writerows(pairs)
    return path


def similarities(url: str, run_id: str) -> np.ndarray:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            found = conn.execute(sa.text(
                "SELECT similarity FROM similarity_scores WHERE run_id = :r "
                "AND similarity IS NOT NULL"), {"r": run_id}).scalars()
            return np.array(list(found), dtype=np.float64)
    finally:
        engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
         tiny_model: Path, image_server: ImageServer) -> Iterator[Runs]:
    folder = tmp_path_factory.mktemp(f"drift-{request.param}")
    url = f"sqlite:///{folder / 'results.db'}" if request.param == "sqlite" \
        else request.getfixturevalue("pg_url")
    tag = uuid.uuid4().hex[:6]
    urls = serve_good_images(image_server, ROWS, prefix=f"drift-{tag}")
    pairs = [(u, f"a photo number {i}") for i, u in enumerate(urls)]
    canaries = [(u, f"a canary photo {i}")
                for i, u in enumerate(serve_good_images(image_server, 5, f"canary-{tag}"))]
    settings = Settings(model=str(tiny_model), store=str(folder / "store"), database_url=url,
                        device="cpu", precision="fp32", batch_size=8, fetch_timeout=3.0,
                        allow_hosts=image_server.allow_hosts,
                        canary_csv=str(write_csv(folder / "canaries.csv", canaries)))

    def score(name: str, path: Path, **changes: object) -> str:
        run_id = f"{name}-{tag}"
        score_csv(path, settings.replace(**changes), progress=False, run_id=run_id)
        return run_id

    base = score("base", write_csv(folder / "day1" / f"pairs-{tag}.csv", pairs))
    scored = similarities(url, base)
    top = [pairs[i] for i in np.argsort(-scored, kind="stable")[:ROWS // 4]]
    pinned = settings.replace(drift_reference=base)
    settings = pinned
    top_run = score("top", write_csv(folder / f"top-{tag}.csv", top))
    other = build_random_clip(folder / "other-clip", shape="tiny", seed=1)
    checkpoint = score("checkpoint", write_csv(folder / f"checkpoint-{tag}.csv", pairs),
                       model=str(other))
    gone = [(image_server.add(f"/drift-{tag}-gone/{i}.jpg", Route(404, b"gone", "text/plain")),
             caption) if i % 2 else (u, caption) for i, (u, caption) in enumerate(pairs)]
    half = score("half", write_csv(folder / "day2" / f"pairs-{tag}.csv", gone))
    yield Runs(settings, base, top_run, half, checkpoint, folder)


def drift(capsys: pytest.CaptureFixture[str], runs: Runs, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    status = cli.main(["results", "drift", *args, "--database-url", runs.settings.database_url])
    out, err = capsys.readouterr()
    assert not err, err
    return status, out


def drift_json(capsys: pytest.CaptureFixture[str], runs: Runs, *args: str
               ) -> tuple[int, dict[str, object]]:
    status, out = drift(capsys, runs, *args, "--json")
    return status, json.loads(out)


def recorded(runs: Runs) -> list[tuple[str, str, str]]:
    table = sa.table("score_drift", sa.column("run_id"), sa.column("against_run_id"),
                     sa.column("verdict"))
    with ResultsDB(runs.settings.database_url).engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(table).order_by(table.c.run_id))]


def test_a_run_against_itself_is_stable_with_psi_zero(
        runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    status, found = drift_json(capsys, runs, runs.base, "--against", runs.base)
    assert status == 0
    assert found["verdict"] == "stable" and found["reasons"] == []
    assert found["psi"] == 0.0 and found["ks_statistic"] == 0.0 and found["ks_pvalue"] == 1.0
    assert found["wasserstein"] == 0.0 and found["scored_rows"] == ROWS
    assert found["canaries"]["compared"] == 5 and found["canaries"]["moved"] == 0
    status, text = drift(capsys, runs, runs.base, "--against", runs.base)
    assert status == 0
    assert text.splitlines()[0].startswith(f"STABLE: run {runs.base} against {runs.base}")
    assert "5 canaries unchanged" in text
    assert (runs.base, runs.base, "stable") in recorded(runs)


def test_a_run_of_only_the_top_scoring_rows_alerts_with_scipys_figures(
        runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    status, found = drift_json(capsys, runs, runs.top, "--against", runs.base)
    assert status == 3 and found["verdict"] == "alert" and found["exit_status"] == 3
    base = similarities(runs.settings.database_url, runs.base)
    top = similarities(runs.settings.database_url, runs.top)
    assert len(top) == ROWS // 4 and top.min() >= np.quantile(base, 0.7)
    expected = stats.ks_2samp(base, top)
    assert found["ks_statistic"] == pytest.approx(expected.statistic)
    assert found["ks_pvalue"] == pytest.approx(expected.pvalue)
    assert found["wasserstein"] == pytest.approx(
        stats.wasserstein_distance(base, top) / base.std())
    deciles = np.unique(np.quantile(base, np.arange(1, 10) / 10, method="inverted_cdf"))
    expected_share = np.maximum(np.bincount(np.searchsorted(deciles, base), minlength=10)
                                [:len(deciles) + 1] / len(base), 1e-4)
    actual_share = np.maximum(np.bincount(np.searchsorted(deciles, top),
                                          minlength=len(deciles) + 1) / len(top), 1e-4)
    expected_psi = np.sum((actual_share - expected_share) * np.log(actual_share / expected_share))
    assert found["psi"] == pytest.approx(expected_psi) and found["psi"] >= 0.25
    assert found["share_above"] == pytest.approx(float((top > 0.6).mean()))
    assert any(reason.startswith("PSI ") for reason in found["reasons"])
    assert found["canaries"]["moved"] == 0  # same model: the data moved, not the model
    assert (runs.top, runs.base, "alert") in recorded(runs)


def test_half_the_urls_failing_alerts_on_the_error_share_against_the_previous_day(
        runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    status, text = drift(capsys, runs, runs.half_failing)  # default: the earlier pairs.csv
    assert status == 3
    first = text.splitlines()[0]
    assert first.startswith(f"ALERT: run {runs.half_failing} against {runs.base}: ")
    assert "http_404 0.0% -> 50.0% of rows (+50.0 points)" in first
    assert "error http_404" in text and "0.0% -> 50.0%" in text


def test_another_checkpoint_flags_the_canaries_naming_both_models(
        runs: Runs, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_PIPELINE_DRIFT_REFERENCE", runs.base)  # its input: no earlier run
    status, found = drift_json(capsys, runs, runs.other_checkpoint)
    assert status == 3 and found["against_run_id"] == runs.base
    canaries = found["canaries"]
    assert canaries["compared"] == 5 and canaries["moved"] >= 1
    assert canaries["run_scorer"] == \
        f"model {runs.folder / 'other-clip'}, precision fp32, backend torch"
    assert canaries["against_scorer"] == f"model {runs.settings.model}, precision fp32, " \
                                         "backend torch"
    assert any("model or preprocessing changed" in r for r in found["reasons"])


def test_the_report_shows_the_verdict_both_histograms_figures_and_canaries(runs: Runs) -> None:
    page = next(runs.folder.glob("checkpoint-*_scored_report.html")).read_text(encoding="utf-8")
    drift_html = page[page.index("<h2>Drift</h2>"):]
    drift_html = drift_html[:drift_html.index("</section>")]
    assert f"ALERT: run {runs.other_checkpoint} against {runs.base}" in drift_html
    assert 'fill="#4c78a8"' in drift_html and 'fill="#f58518"' in drift_html
    assert "PSI (10 bins" in drift_html and "Wasserstein / reference std" in drift_html
    assert "model or preprocessing changed" in drift_html
    first = next((runs.folder / "day1").glob("*_report.html")).read_text(encoding="utf-8")
    assert "No drift figures: Run " in first  # the first run has nothing to compare with


def test_a_comparison_made_again_replaces_its_record(
        runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    drift(capsys, runs, runs.top, "--against", runs.base)
    drift(capsys, runs, runs.top, "--against", runs.base)
    assert [r for r in recorded(runs) if r[:2] == (runs.top, runs.base)] == \
        [(runs.top, runs.base, "alert")]


def test_no_reference_is_one_sentence_and_exit_2(
        runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    status = cli.main(["results", "drift", runs.base, "--database-url",
                       runs.settings.database_url])
    err = capsys.readouterr().err
    assert status == 2 and "has no earlier succeeded run of the same input" in err
    assert "Traceback" not in err


def test_large_runs_use_smirnovs_asymptotic_p_value_as_scipy_does(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    a, b = np.round(rng.uniform(0.3, 0.7, 12_000), 4), np.round(rng.uniform(0.31, 0.72, 11_000), 4)
    as_scores = [Scores.of(Counter(np.round(x * 10_000).astype(int).tolist())) for x in (a, b)]
    d, p = ks_test(*as_scores)
    expected = stats.ks_2samp(a, b)
    assert d == pytest.approx(expected.statistic) and p == pytest.approx(expected.pvalue)
    assert psi(as_scores[0], as_scores[0]) == 0.0
    db = ResultsDB(f"sqlite:///{tmp_path / 'r.db'}")
    with pytest.raises(UserError, match="not in the results database"):
        measure_drift(db, "nope", "nope")


@pytest.mark.parametrize("rows", [500, 12_000])  # ks_2samp's exact and asymptotic p-values
def test_identical_runs_get_scipys_figures_without_scipy(rows: int) -> None:
    rng = np.random.default_rng(5)
    a = np.round(rng.uniform(0.3, 0.7, rows), 4)
    same = Scores.of(Counter(np.round(a * 10_000).astype(int).tolist()))
    again = Scores.of(Counter(np.round(a * 10_000).astype(int).tolist()))
    expected = stats.ks_2samp(a, a.copy())
    assert ks_test(same, again) == (expected.statistic, expected.pvalue) == (0.0, 1.0)
    assert normalised_wasserstein(same, again) == stats.wasserstein_distance(a, a.copy()) == 0.0


def test_thresholds_come_from_settings(
        runs: Runs, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_PIPELINE_DRIFT_PSI_ALERT", "1000")
    monkeypatch.setenv("SIM_PIPELINE_DRIFT_WASSERSTEIN_ALERT", "1000")
    status, found = drift_json(capsys, runs, runs.top, "--against", runs.base)
    assert status == 0 and found["verdict"] == "watch"  # PSI still over the 0.1 watch line
    assert found["thresholds"]["psi_alert"] == 1000.0
    monkeypatch.setenv("SIM_PIPELINE_DRIFT_ERROR_POINTS_ALERT", "51")
    status, found = drift_json(capsys, runs, runs.half_failing, "--against", runs.base)
    assert not any("http_404" in reason for reason in found["reasons"])
