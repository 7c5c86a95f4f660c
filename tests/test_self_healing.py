"""A damaged or missing object in the store is never used and never a crash: it is recomputed
from its inputs (refetched, re-embedded, re-scored), noted in the run summary, and the output is
the same as from an intact store. Digests live in the objects' own records, so this holds on a
file system without extended attributes (they are removed here) as on S3."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from sim_pipeline import cli
from sim_pipeline.core.config import Settings
from sim_pipeline.core.layout import image_key, sha256_hex
from tests.conftest import ImageServer
from tests.pairs import Case, serve_good_images, write_cases
from tests.test_score_cli import score

XATTR = "user.sim_pipeline.sha256"


def scored_run(tmp_path: Path, settings: Settings, server: ImageServer, prefix: str
               ) -> tuple[Path, bytes]:
    urls = serve_good_images(server, 6, prefix=prefix)
    cases = [Case(u, f"caption {i}", None) for i, u in enumerate(urls)] * 2
    source = write_cases(tmp_path / "pairs.csv", cases)
    assert score(source, settings, "--chunk-size", "5") == 0
    return source, (tmp_path / "pairs_scored.csv").read_bytes()


def files(store: Path, where: str = "") -> list[Path]:
    return sorted(p for p in (store / where).rglob("*") if p.is_file())


def drop_xattrs(store: Path) -> None:
    """As a copy without extended attributes (or a file system without them) would leave it."""
    for path in files(store):
        if XATTR in os.listxattr(path):
            os.removexattr(path, XATTR)


def image_bytes(store: Path) -> list[Path]:
    return [p for p in files(store, "images") if p.suffix != ".json"]


def test_deleted_image_bytes_are_fetched_again(
        tmp_path: Path, settings: Settings, image_server: ImageServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    source, first = scored_run(tmp_path, settings, image_server, "heal-deleted")
    store = Path(settings.store)
    for path in [*image_bytes(store), *files(store, "embeddings")]:
        path.unlink()  # the records stay: they say the images were fetched
    before = image_server.total_requests()
    capsys.readouterr()
    assert score(source, settings, "--chunk-size", "5", "--run-id", "after-loss") == 0
    out = capsys.readouterr().out
    assert image_server.total_requests() - before == 6
    assert (tmp_path / "pairs_scored.csv").read_bytes() == first
    assert "repaired  6 damaged or missing objects recomputed (image 6)" in out


def scored_without_xattrs(tmp_path: Path, settings: Settings, server: ImageServer,
                          prefix: str) -> tuple[Path, bytes, Path]:
    source, first = scored_run(tmp_path, settings, server, prefix)
    drop_xattrs(Path(settings.store))
    return source, first, Path(settings.store)


def test_damaged_objects_without_xattrs_are_caught_and_recomputed(
        tmp_path: Path, settings: Settings, image_server: ImageServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    source, first, store = scored_without_xattrs(tmp_path, settings, image_server,
                                                 "heal-damaged")
    image = image_bytes(store)[0]
    image.write_bytes(image.read_bytes()[:-50] + b"\0" * 50)  # a replaced image
    vector = files(store, "embeddings")[0]
    vector.write_bytes(os.urandom(vector.stat().st_size))  # garbage of the right size
    record = next(p for p in files(store, "images") if p.suffix == ".json")
    record.write_text(record.read_text().replace('"status":200', '"status":201'))
    chunk_outputs = ("-embeddings.", "known-", "fetched.arrow")  # sets and per-chunk indexes
    for path in [p for p in files(store, "runs") if any(s in p.name for s in chunk_outputs)]:
        path.unlink()  # the chunks must be embedded again, from the (partly damaged) cache
    capsys.readouterr()
    assert score(source, settings, "--chunk-size", "5") == 0
    out = capsys.readouterr().out
    assert (tmp_path / "pairs_scored.csv").read_bytes() == first
    assert "repaired" in out and "cached vector 1" in out and "image record 1" in out


def test_store_verify_reports_damage_and_repair_removes_it(
        tmp_path: Path, settings: Settings, image_server: ImageServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    source, first, store = scored_without_xattrs(tmp_path, settings, image_server,
                                                 "heal-verify")
    damaged = [image_bytes(store)[1], files(store, "embeddings")[2]]
    for path in damaged:
        path.write_bytes(b"not what was written")
    capsys.readouterr()
    assert cli.main(["store", "verify", "--store", str(store)]) == 1
    out = capsys.readouterr().out
    assert "damaged   2" in out and all(str(p) in out for p in damaged)
    assert cli.main(["store", "verify", "--repair", "--store", str(store)]) == 0
    assert "removed   3 objects" in capsys.readouterr().out  # the image with its record
    assert cli.main(["store", "verify", "--store", str(store)]) == 0
    assert "damaged   0" in capsys.readouterr().out
    assert score(source, settings, "--chunk-size", "5", "--run-id", "after-repair") == 0
    assert (tmp_path / "pairs_scored.csv").read_bytes() == first


def test_a_random_half_of_the_store_deleted_is_rebuilt_by_a_rerun(
        tmp_path: Path, settings: Settings, image_server: ImageServer) -> None:
    source, first = scored_run(tmp_path, settings, image_server, "heal-half")
    store = Path(settings.store)
    shutil.copytree(store, tmp_path / "intact")
    for seed in range(4):
        shutil.rmtree(store)
        shutil.copytree(tmp_path / "intact", store)
        everything = files(store)
        for path in random.Random(seed).sample(everything, len(everything) // 2):
            path.unlink()
        assert score(source, settings, "--chunk-size", "5") == 0
        assert (tmp_path / "pairs_scored.csv").read_bytes() == first, f"seed {seed}"


def test_one_image_record_and_another_images_bytes_lost_in_one_chunk_are_both_refetched(
        tmp_path: Path, settings: Settings, image_server: ImageServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The record is found missing before any bytes are read, the other image's bytes only
    while embedding: each loss gets its own fetch and neither row becomes ``image_lost``."""
    source, first = scored_run(tmp_path, settings, image_server, "heal-both")
    store = Path(settings.store)
    in_first_chunk = [store / image_key(sha256_hex(image_server.url(f"/heal-both/{i}{suffix}")))
                      for i, suffix in ((0, ".jpg"), (1, ".png"))]
    in_first_chunk[0].with_suffix(".json").unlink()
    in_first_chunk[1].unlink()
    for path in files(store, "embeddings"):
        path.unlink()
    for path in files(store, "runs"):
        if path.name.startswith(("image-embeddings.", "results.")):
            path.unlink()
    before = image_server.total_requests()
    capsys.readouterr()
    assert score(source, settings, "--chunk-size", "5") == 0
    assert "image_lost" not in capsys.readouterr().out
    assert image_server.total_requests() - before == 2
    assert (tmp_path / "pairs_scored.csv").read_bytes() == first
