"""Planning: finding columns, validating rows, chunking, and refusing unusable files clearly."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from sim_pipeline import cli
from sim_pipeline.core.config import Settings
from sim_pipeline.core.store import LocalStore
from sim_pipeline.stages.plan import plan_csv, read_chunk_rows


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("header", "url_col", "caption_col"), [
    ("URL,Caption", "URL", "Caption"),
    ("id,Image_Url,TEXT", "Image_Url", "TEXT"),
    ("img_url,title", "img_url", "title"),
    ("link,caption_text,extra", "link", "caption_text"),
])
def test_columns_are_found_case_insensitively(tmp_path: Path, header: str, url_col: str,
                                              caption_col: str) -> None:
    values = ",".join("http://x.test/a.jpg" if h == url_col else "a cat" if h == caption_col
                      else "v" for h in header.split(","))
    source = write(tmp_path / "in.csv", f"{header}\n{values}\n")
    plan = plan_csv(source, LocalStore(tmp_path / "s"), Settings(), "r")
    assert (plan.url_column, plan.caption_column) == (url_col, caption_col)


def test_column_overrides_win(tmp_path: Path) -> None:
    source = write(tmp_path / "in.csv", "url,caption,pic,words\nhttp://a.test/x,one,"
                                        "http://b.test/y,two\n")
    settings = Settings(url_column="PIC", caption_column="words")
    plan = plan_csv(source, LocalStore(tmp_path / "s"), settings, "r")
    (row,) = read_chunk_rows(LocalStore(tmp_path / "s"), plan.chunks[0])
    assert (row.url, row.caption) == ("http://b.test/y", "two")


def test_rows_are_numbered_and_chunked_with_sha256_url_hashes(tmp_path: Path) -> None:
    lines = "".join(f"http://h.test/{i}.jpg,caption {i}\n" for i in range(25))
    source = write(tmp_path / "in.csv", "url,caption\n" + lines)
    store = LocalStore(tmp_path / "s")
    plan = plan_csv(source, store, Settings(chunk_size=10), "r")
    assert [(c.first_row, c.rows) for c in plan.chunks] == [(0, 10), (10, 10), (20, 5)]
    rows = [r for c in plan.chunks for r in read_chunk_rows(store, c)]
    assert [r.row for r in rows] == list(range(25))
    assert rows[7].url_hash == hashlib.sha256(b"http://h.test/7.jpg").hexdigest()


def test_ragged_rows_are_kept_with_a_code(tmp_path: Path) -> None:
    source = write(tmp_path / "in.csv", "url,caption,note\nhttp://a.test/x\n"
                                        "http://a.test/y,cap,n,surplus\n")
    store = LocalStore(tmp_path / "s")
    short, long = read_chunk_rows(store, plan_csv(source, store, Settings(), "r").chunks[0])
    assert (short.fields, short.error) == (["http://a.test/x", "", ""], "missing_caption")
    assert (long.fields, long.error) == (["http://a.test/y", "cap", "n"], "malformed_row")


def test_replanning_the_same_input_reuses_the_plan(tmp_path: Path) -> None:
    source = write(tmp_path / "in.csv", "url,caption\nhttp://a.test/x,cap\n")
    store = LocalStore(tmp_path / "s")
    first = plan_csv(source, store, Settings(), "r")
    rows_file = Path(store.uri(first.chunks[0].rows_key))
    stamp = rows_file.stat().st_mtime_ns
    assert plan_csv(source, store, Settings(), "r") == first
    assert rows_file.stat().st_mtime_ns == stamp


@pytest.mark.parametrize(("content", "message"), [
    (None, "does not exist"),
    (b"\x89PNG\r\n\x1a\n\0\0\0binary", "not a CSV file"),
    (b"", "is empty"),
    (b"name,caption\nx,y\n", "No url column found"),
    (b"url,description\nhttp://a.test/x,y\n", "No caption column found"),
    ("url,caption\nhttp://a.test/x,y\n".encode("utf-16-le"), "not a CSV file"),
])
def test_unusable_input_exits_non_zero_with_one_sentence(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], settings: Settings,
        content: bytes | None, message: str) -> None:
    source = tmp_path / "input.csv"
    if content is not None:
        source.write_bytes(content)
    code = cli.main(["score", str(source), "--quiet", "--store", settings.store,
                     "--database-url", settings.database_url, "--model", settings.model])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "input_scored.csv").exists()
