"""`make demo` works offline on a fresh clone: its script, run as the Makefile runs it."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_demo_scores_its_csv_offline_and_says_the_scores_are_meaningless(
        tmp_path: Path) -> None:
    pairs, out, model = tmp_path / "pairs.csv", tmp_path / "out", tmp_path / "random-clip"
    done = subprocess.run(
        [sys.executable, "-m", "sim_pipeline.devtools.demo", "--csv", str(pairs), "--out", str(out),
         "--model", str(model), "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    shown = done.stdout
    assert shown.count("RANDOM weights: every similarity here is meaningless") == 2
    assert "rows      43: 36 scored, 7 errors" in shown
    assert f"report    {out / 'pairs_scored_report.html'}" in shown
    assert (out / "pairs_scored_report.html").stat().st_size > 0
    assert (model / "config.json").exists()  # built, since it was missing

    with (out / "pairs_scored.csv").open(newline="", encoding="utf-8") as handle:
        scored = list(csv.DictReader(handle))
    assert [row["error"] for row in scored] == [row["expected_error"] for row in scored]
    assert {row["error"] for row in scored} == {
        "", "http_404", "not_an_image", "decode_error", "invalid_url", "unsupported_scheme",
        "blocked_address", "missing_caption"}
    assert all(0.0 <= float(row["similarity"]) <= 1.0 for row in scored if not row["error"])


def test_the_checked_in_sample_is_what_the_demo_writes(tmp_path: Path) -> None:
    """examples/pairs.csv is the demo's own output on its default port, not a hand-typed file."""
    from sim_pipeline.devtools import demo

    pictures = demo.write_images(tmp_path / "images")
    demo.write_pairs(tmp_path / "pairs.csv", f"http://127.0.0.1:{demo.DEFAULT_PORT}", pictures)
    assert (tmp_path / "pairs.csv").read_bytes() == (REPO / "examples" / "pairs.csv").read_bytes()
