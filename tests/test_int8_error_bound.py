"""An int8 run says how far its scores are from fp32's, measured on its own pairs.

Tiny random-weight checkpoint: the scores are meaningless, the bound is what is checked. It must
agree with scoring the same file at fp32 and comparing the scored CSVs (to the 4-decimal rounding
of similarities), appear in the summary, and be kept on the run's record.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from sim_pipeline.core.config import Settings
from sim_pipeline.core.layout import model_tag
from sim_pipeline.stages.embed.error_bound import SAMPLE_PAIRS
from tests.conftest import ImageServer
from tests.pairs import Case, read_csv, serve_good_images, write_cases
from tests.test_score_cli import score


def run_record(database_url: str, run_id: str) -> tuple:
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        row = conn.execute(sa.text(
            "SELECT error_bound_pairs, error_bound_max, error_bound_p99 FROM scoring_runs "
            "WHERE run_id = :run"), {"run": run_id}).one()
    engine.dispose()
    return tuple(row)


def similarities(path: Path) -> list[float]:
    return [float(row[-2]) for row in read_csv(path)[1:]]


def test_an_int8_run_reports_its_error_against_fp32(
        tmp_path: Path, settings: Settings, image_server: ImageServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    urls = serve_good_images(image_server, 6, prefix="int8-bound")
    cases = [Case(url, f"caption {i} " + "word " * i, None) for i, url in enumerate(urls * 2)]
    source = write_cases(tmp_path / "pairs.csv", cases)

    assert score(source, settings, "--backend", "onnx-int8", "--run-id", "int8",
                 "-o", str(tmp_path / "int8.csv"), "--chunk-size", "5") == 0
    summary = capsys.readouterr().out
    fp32_vectors = Path(settings.store) / "embeddings" / model_tag(settings.model, "onnx")
    assert len(list(fp32_vectors.rglob("*.f32"))) == 6 + 12, "the sample's fp32 vectors, cached"
    assert score(source, settings, "--backend", "onnx", "--run-id", "fp32",
                 "-o", str(tmp_path / "fp32.csv")) == 0
    assert "int8 " not in capsys.readouterr().out, "full precision has no bound to report"

    pairs, largest, p99 = run_record(settings.database_url, "int8")
    assert pairs == min(len(cases), SAMPLE_PAIRS)
    assert 0 <= p99 <= largest
    line = next(line for line in summary.splitlines() if line.startswith("int8 "))
    assert f"max {largest:.4f}, p99 {p99:.4f} over {pairs} of this run's pairs" in line
    observed = max(abs(a - b) for a, b in zip(similarities(tmp_path / "int8.csv"),
                                              similarities(tmp_path / "fp32.csv"), strict=True))
    assert observed == pytest.approx(largest, abs=1e-4 + 1e-6), "rounding aside, the same"
    assert run_record(settings.database_url, "fp32") == (None, None, None)


HEAVY_PROBE = ("import sys; from sim_pipeline.cli import main; code = main(sys.argv[1:]); "
               "print(code, sorted(m for m in ('onnxruntime', 'torch', 'transformers') "
               "if m in sys.modules))")


def test_int8_runs_with_exports_in_the_store_need_neither_torch_nor_transformers(
        tmp_path: Path, settings: Settings, image_server: ImageServer) -> None:
    """Once the towers are exported: a cold run (new images and captions, the model check not
    remembered) computes through ONNX Runtime alone, its error bound included; a rerun whose
    vectors are all cached, under a new run id, loads no model at all."""
    first = write_cases(tmp_path / "first.csv", [
        Case(url, f"first caption {i}", None)
        for i, url in enumerate(serve_good_images(image_server, 3, prefix="int8-export"))])
    assert score(first, settings, "--backend", "onnx-int8") == 0  # exports both towers
    shutil.rmtree(Path(settings.store) / "model-checks")
    fresh = write_cases(tmp_path / "fresh.csv", [
        Case(url, f"a fresh caption {i}", None)
        for i, url in enumerate(serve_good_images(image_server, 4, prefix="int8-fresh"))])
    flags = ["--model", settings.model, "--store", settings.store, "--database-url",
             settings.database_url, "--allow-hosts", settings.allow_hosts,
             "--backend", "onnx-int8"]
    for run_id, imported in (("cold", "['onnxruntime']"), ("warm", "[]")):
        done = subprocess.run([sys.executable, "-c", HEAVY_PROBE, "score", str(fresh), *flags,
                               "--run-id", run_id], capture_output=True, text=True, check=True)
        assert done.stdout.strip().splitlines()[-1] == f"0 {imported}", (run_id, done.stdout)
        assert "int8      |similarity - fp32| max" in done.stdout, "the bound, measured"
        assert run_record(settings.database_url, run_id)[0] == 4
