"""Images just under the pixel cap do not multiply a run's memory: decoding is bounded by the
pixels in flight, so six of them peak where one does (each run its own process, measured whole)."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

from bench.end_to_end import timed_process
from bench.hostile_images import write_huge_images
from sim_pipeline.core.config import Settings
from tests.airflow_helpers import write_pairs
from tests.conftest import ImageServer, Route

SIDE = 7000  # 49 MP: just under the default 50 MP cap; ~147 MB once decoded


def peak_mb(tmp_path: Path, settings: Settings, urls: list[str], name: str) -> float:
    source = write_pairs(tmp_path / f"{name}.csv", urls)
    command = [str(Path(sys.executable).with_name("sim-pipeline")), "score", str(source),
               "--quiet", "--model", settings.model, "--store", str(tmp_path / name),
               "--database-url", f"sqlite:///{tmp_path / name}.db", "--device", "cpu",
               "--allow-hosts", settings.allow_hosts]
    _, peak = timed_process(command, dict(os.environ))
    with (tmp_path / f"{name}_scored.csv").open(newline="", encoding="utf-8") as scored:
        rows = list(csv.DictReader(scored))
    assert len(rows) == len(urls) and not [r for r in rows if r["error"]], rows
    return peak


def test_six_huge_images_peak_where_one_does(tmp_path: Path, settings: Settings,
                                             image_server: ImageServer) -> None:
    names = write_huge_images(tmp_path / "huge", 6, SIDE)
    urls = [image_server.add(f"/huge/{n}", Route(body=(tmp_path / "huge" / n).read_bytes()))
            for n in names]
    one = peak_mb(tmp_path, settings, urls[:1], "one")
    six = peak_mb(tmp_path, settings, urls, "six")
    assert six < one + 100, f"peak RSS {six:.0f} MB with six vs {one:.0f} MB with one"
