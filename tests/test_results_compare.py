"""``sim-pipeline results compare``: its figures are numpy's, on PostgreSQL and on SQLite.

Two runs are written through ``ResultsDB`` as join-score writes them: the same pairs in another
order and under other row numbers, repeats, failures, pairs only one run has, tied scores. The
expected figures are computed here from the pairs themselves, independently of the module.
"""

from __future__ import annotations

import math
import re
import uuid
from pathlib import Path

import numpy as np
import pytest

from sim_pipeline import cli
from sim_pipeline.core.layout import sha256_hex
from sim_pipeline.results.db import ResultsDB

MATCHED = 190  # pairs 0..189 have a score in both runs


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.db'}"
    return request.getfixturevalue("pg_url")


def row(run_id: str, number: int, pair: int, similarity: float | None) -> dict[str, object]:
    url, caption = f"http://img.test/{pair}.jpg", f"caption of pair {pair}"
    return {"run_id": run_id, "row_number": number, "image_url": url, "url_hash": sha256_hex(url),
            "caption": caption, "caption_hash": sha256_hex(caption), "model": "m",
            "similarity": similarity, "cosine": None if similarity is None else 0.0,
            "error": "http_404" if similarity is None else None, "input_fields": None}


def scores_of_pairs() -> tuple[np.ndarray, np.ndarray]:
    """Run A's and run B's similarity per pair (0..199): correlated, some tied in each run."""
    rng = np.random.default_rng(7)
    a = rng.uniform(0.3, 0.9, 200)
    b = 0.4 + 0.5 * a + rng.normal(0.0, 0.06, 200)
    a[:40] = np.round(a[:40], 2)  # ties
    b[40:80] = np.round(b[40:80], 2)
    return np.round(a, 4), np.round(b, 4)


def write_runs(url: str) -> tuple[str, str, np.ndarray, np.ndarray]:
    run_a, run_b = f"cmp-a-{uuid.uuid4().hex[:6]}", f"cmp-b-{uuid.uuid4().hex[:6]}"
    a, b = scores_of_pairs()
    rows_a = [row(run_a, i, i, float(a[i])) for i in range(200)]
    rows_a += [row(run_a, 200, 0, float(a[0]))]                          # a pair repeated
    rows_a += [row(run_a, 201 + i, 400 + i, 0.5) for i in range(10)]     # only in A
    pairs_b = list(reversed(range(200)))
    rows_b = [row(run_b, n, p, None if p >= MATCHED else float(b[p]))    # 190..199 failed in B
              for n, p in enumerate(pairs_b)]
    rows_b += [row(run_b, 200 + i, 300 + i, 0.7) for i in range(10)]     # only in B
    db = ResultsDB(url)
    for run_id, rows in ((run_a, rows_a), (run_b, rows_b)):
        db.start_run(run_id, "pairs.csv", "m", len(rows))
        db.upsert_scores(rows)
        db.finish_run(run_id, "succeeded")
    return run_a, run_b, a[:MATCHED], b[:MATCHED]


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based, ties sharing their average: below + (equal + 1) / 2, counted one by one."""
    return np.array([(values < v).sum() + ((values == v).sum() + 1) / 2 for v in values])


def compare(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = cli.main(["results", "compare", *args])
    out, err = capsys.readouterr()
    return status, out, err


def field(out: str, label: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith(label + " ")]
    return line[len(label):].strip()


def test_compare_prints_numpys_correlations_shares_and_disagreements(
        database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    run_a, run_b, x, y = write_runs(database_url)
    status, out, err = compare(capsys, run_a, run_b, "--threshold", "0.6,0.75", "--top", "10%",
                               "--database-url", database_url)
    assert (status, err) == (0, "")

    assert field(out, "run A") == f"{run_a}: 211 scored rows"
    assert field(out, "run B") == f"{run_b}: 200 scored rows"
    assert field(out, "matched").startswith(f"{MATCHED} rows scored in both")
    assert field(out, "pearson") == f"{np.corrcoef(x, y)[0, 1]:.4f}"
    rho = np.corrcoef(average_ranks(x), average_ranks(y))[0, 1]
    assert field(out, "spearman") == f"{rho:.4f}"

    size = math.ceil(MATCHED * 0.10)
    top_x = set(sorted(range(MATCHED), key=lambda i: (-x[i], i))[:size])
    top_y = set(sorted(range(MATCHED), key=lambda i: (-y[i], i))[:size])
    both = len(top_x & top_y)
    assert field(out, "top 10%") == f"{size} rows each, {both} ({both / size:.1%}) in both"

    keep_x, keep_y = x >= 0.6, y >= 0.75
    kept = [int(keep_x.sum()), int(keep_y.sum()), int((keep_x & keep_y).sum()),
            int((keep_x == keep_y).sum())]
    shares = [f"{k} ({k / MATCHED:.1%})" for k in kept]
    assert field(out, "kept") == (f"at >= 0.6 / 0.75: A {shares[0]}, B {shares[1]}, "
                                  f"both {shares[2]}; A and B agree on {shares[3]}")

    doubled_x, doubled_y = 2 * average_ranks(x), 2 * average_ranks(y)  # exact: halves only
    worst = sorted(range(MATCHED), key=lambda i: (-abs(doubled_x[i] - doubled_y[i]), i))[:10]
    printed = [re.split(r" {2,}", line.strip()) for line in out.splitlines()
               if re.match(r"^\s*\d+\s{2,}\d+\s{2,}", line)]
    expected = [[str(i), str(199 - i), f"{x[i]:.4f}", f"{100 * (doubled_x[i] - 1) / 380:.1f}",
                 f"{y[i]:.4f}", f"{100 * (doubled_y[i] - 1) / 380:.1f}",
                 f"http://img.test/{i}.jpg", f"caption of pair {i}"] for i in worst]
    assert printed == expected


def test_one_threshold_serves_both_runs(database_url: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    run_a, run_b, x, y = write_runs(database_url)
    status, out, _ = compare(capsys, run_a, run_b, "--threshold", "0.65", "--database-url",
                             database_url)
    both = int(((x >= 0.65) & (y >= 0.65)).sum())
    assert status == 0 and f"both {both} ({both / MATCHED:.1%})" in field(out, "kept")
    assert field(out, "kept").startswith("at >= 0.65: ")


@pytest.mark.parametrize("case", ["unknown run", "nothing in common"])
def test_unknown_runs_or_no_common_rows_are_one_sentence_and_exit_2(
        database_url: str, capsys: pytest.CaptureFixture[str], case: str) -> None:
    run_a, run_b, _, _ = write_runs(database_url)
    db = ResultsDB(database_url)
    alone = f"cmp-alone-{uuid.uuid4().hex[:6]}"
    db.start_run(alone, "other.csv", "m", 1)
    db.upsert_scores([row(alone, 0, 999, 0.5)])
    other = "no-such-run" if case == "unknown run" else alone
    status, out, err = compare(capsys, run_a, other, "--database-url", database_url)
    assert (status, out) == (2, "")
    assert len(err.strip().splitlines()) == 1
    assert ("no-such-run" in err) if case == "unknown run" else ("no scored row in common" in err)
