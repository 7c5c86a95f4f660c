"""Configuration is read in one place (core/config.py), each setting's help is declared beside
its field and docs/configuration.md's table is generated from it, a refused value is named as
what the user typed (the flag, or the environment variable), and repairs are counted per step:
those made in fetch worker processes included, one warning per kind of object."""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sim_pipeline import cli
from sim_pipeline.core import repairs
from sim_pipeline.core.config import Settings, user_settings
from sim_pipeline.core.layout import image_meta_key, sha256_hex
from sim_pipeline.core.store import LocalStore
from sim_pipeline.devtools.settings_table import settings_table
from sim_pipeline.stages.fetch.chunk import fetch_all
from tests.conftest import ImageServer
from tests.pairs import Case, serve_good_images, write_cases
from tests.test_score_cli import score

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("sim_pipeline", "plugins", "dags")


def test_every_setting_declares_its_help_and_the_configuration_page_shows_it() -> None:
    assert [f.name for f in user_settings() if not f.metadata.get("help")] == []
    page = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    missing = [f.name for f in user_settings() if f"`SIM_PIPELINE_{f.name.upper()}`" not in page]
    assert missing == [], f"docs/configuration.md lacks {missing}"
    assert settings_table() in page, "regenerate: python -m sim_pipeline.devtools.settings_table"
    assert "run_id" not in {f.name for f in user_settings()}  # a run's name, not a setting


def test_only_the_configuration_reader_reads_sim_pipeline_variables() -> None:
    readers = sorted(str(path.relative_to(REPO)) for folder in PRODUCT
                     for path in (REPO / folder).rglob("*.py")
                     if re.search(r"os\.environ|getenv", text := path.read_text(encoding="utf-8"))
                     and re.search(r"SIM_PIPELINE_|ENV_PREFIX", text))
    assert readers == ["sim_pipeline/core/config.py"]


@pytest.mark.parametrize(("flags", "environ", "said", "unsaid"), [
    (["--database-url", "definitely not a url"], {},
     "--database-url 'definitely not a url' is not a database URL", "SIM_PIPELINE_"),
    (["--store", "s3:///p"], {}, "--store 's3:///p' names no bucket", "SIM_PIPELINE_"),
    ([], {"SIM_PIPELINE_STORE": "s3:///p"}, "SIM_PIPELINE_STORE='s3:///p' names no bucket",
     "--store"),
    (["--batch-size", "0"], {}, "--batch-size 0 must be a positive integer", "SIM_PIPELINE_"),
])
def test_a_refused_value_is_named_as_the_user_gave_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        flags: list[str], environ: dict[str, str], said: str, unsaid: str) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    source = write_cases(tmp_path / "pairs.csv", [Case("http://127.0.0.1:9/a.jpg", "a", None)])
    assert cli.main(["score", str(source), *flags]) == 2
    err = capsys.readouterr().err
    assert said in err and unsaid not in err and len(err.strip().splitlines()) == 1


def test_repairs_in_fetch_worker_processes_are_counted_by_the_step_that_ran_them(
        settings: Settings, image_server: ImageServer) -> None:
    urls = {sha256_hex(u): u for u in serve_good_images(image_server, 10, prefix="workers")}
    store = LocalStore(settings.store)
    split = settings.replace(fetch_processes=2)
    assert fetch_all(urls, store, split, min_per_process=5).ok == 10
    for url_hash in urls:  # every record damaged: each is noted, then fetched again
        record = Path(settings.store) / image_meta_key(url_hash)
        record.write_text(record.read_text().replace('"status":200', '"status":201'))
    with repairs.counted() as found:
        assert fetch_all(urls, store, split, min_per_process=5).ok == 10
    assert found == Counter({"image record": 10})


def test_a_pruned_store_warns_once_per_kind_of_object_with_its_count(
        tmp_path: Path, settings: Settings, image_server: ImageServer,
        caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    urls = serve_good_images(image_server, 6, prefix="pruned")
    source = write_cases(tmp_path / "pairs.csv", [Case(u, f"caption {i}", None)
                                                  for i, u in enumerate(urls)])
    assert score(source, settings) == 0
    store = Path(settings.store)
    for path in [p for p in (store / "images").rglob("*") if p.is_file()
                 and p.suffix != ".json"] + list((store / "embeddings").rglob("*.*")):
        if path.is_file():
            path.unlink()
    caplog.set_level(logging.WARNING)
    assert score(source, settings, "--run-id", "after-pruning") == 0
    warned = [r.getMessage() for r in caplog.records if "ecomput" in r.getMessage()]
    assert warned == ["Recomputed 6 damaged or missing image objects."]
    assert "repaired  6 damaged or missing objects recomputed (image 6)" in capsys.readouterr().out


def test_concurrent_steps_count_only_their_own_repairs_pool_threads_included() -> None:
    start = threading.Barrier(2)

    def step(kind: str) -> Counter[str]:
        with repairs.counted() as found, ThreadPoolExecutor(4) as pool:
            start.wait()
            list(pool.map(repairs.carried(lambda i: repairs.note(kind, f"#{i}", "missing")),
                          range(50)))
            repairs.note(kind, "in the step", "damaged")
        return found

    with ThreadPoolExecutor(2) as steps:
        first, second = steps.map(step, ["image", "cached vector"])
    assert (first, second) == (Counter({"image": 51}), Counter({"cached vector": 51}))
