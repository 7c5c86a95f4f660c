"""Plan's two CSV readers read every file alike: pyarrow's reader on plain blocks of lines, and
Python's ``csv`` module on the rest give the same chunks (rows, numbers, codes, values byte for
byte) as Python's parser alone, whatever the file holds and wherever the block edges fall."""

from __future__ import annotations

import codecs
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from sim_pipeline.core.config import Settings
from sim_pipeline.core.store import LocalStore
from sim_pipeline.stages import plan
from sim_pipeline.stages.long_rows import Spill

PLAIN = "".join(f"{i},http://img.test/{i % 7}.jpg,caption {i % 5}\r\n" for i in range(40))
AWKWARD = {
    "quoted": 'q,"http://img.test/a.jpg","a ""quoted"", caption"\r\n',
    "quoted empty": 'q,"","http://img.test/a.jpg"\r\n',
    "quoted last": 'q,http://img.test/a.jpg,"last, at the end"',
    "text after quote": 'q,"http://img.test/a.jpg"x,cap\r\n',
    "quote never closed": 'q,http://img.test/a.jpg,"open\r\n',
    "space before quote": 'q,http://img.test/a.jpg, "cap"\r\n',
    "quote inside": 'q,http://img.test/a"b.jpg,say "hi"\r\n',
    "line break in quotes": 'q,http://img.test/a.jpg,"two\nlines"\r\n',
    "nul": "q,http://img.test/a.jpg,nul\0byte\r\n",
    "lone cr": "q,http://img.test/a.jpg,cr\ronly\r\n",
    "blank line": "\r\n",
    "lf only": "q,http://img.test/a.jpg,lf\n",
    "too few": "q,http://img.test/a.jpg\r\n",
    "too many": "q,http://img.test/a.jpg,cap,extra\r\n",
    "no caption": "q,http://img.test/a.jpg,\r\n",
    "bad url": "q,ftp://img.test/a.jpg,cap\r\n",
    "spaces": "q, http://img.test/a.jpg , cap \r\n",
    "unicode": "q,http://img.test/é.jpg,é ü 😀 \u2028 \u0085\r\n",
    "byte-order mark": "\ufeffq,http://img.test/a.jpg,cap\r\n",
}


def chunks(path: Path, fast: bool, chunk_size: int = 7) -> list[list[dict]]:
    """Each chunk table of ``path`` as Python values."""
    settings = Settings(chunk_size=chunk_size)
    _, _, _, tables = plan.csv_tables(path, settings, fast=fast)
    return [table.to_pylist() for table in tables]


def assert_readers_agree(path: Path, chunk_size: int = 7) -> None:
    slow = chunks(path, fast=False, chunk_size=chunk_size)
    assert chunks(path, fast=True, chunk_size=chunk_size) == slow
    assert [r["row"] for c in slow for r in c] == list(range(sum(map(len, slow))))


@pytest.fixture(params=[64, 1 << 24], ids=["small blocks", "one block"])
def block_bytes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(plan, "BLOCK_BYTES", request.param)
    return request.param


@pytest.mark.usefixtures("block_bytes")
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("kind", sorted(AWKWARD))
def test_an_awkward_row_anywhere_reads_as_pythons_csv_module_reads_it(
        tmp_path: Path, kind: str, where: str) -> None:
    row = AWKWARD[kind]
    half = "".join(PLAIN.splitlines(keepends=True)[:23])
    body = {"first": row + PLAIN, "middle": half + row + PLAIN[len(half):],
            "last": PLAIN + row}[where]
    source = tmp_path / "in.csv"
    source.write_text("id,url,caption\r\n" + body, encoding="utf-8", newline="")
    assert_readers_agree(source)


@pytest.mark.usefixtures("block_bytes")
@pytest.mark.parametrize(("name", "content"), [
    ("bom.csv", codecs.BOM_UTF8 + b"id,url,caption\n" + PLAIN.encode()),
    ("tabs.tsv", b"id\turl\tcaption\n" + PLAIN.replace(",", "\t").encode()),
    ("no-end.csv", b"id,url,caption\n" + PLAIN.encode().rstrip(b"\r\n")),
    ("quoted-header.csv", b'"id","url","caption"\n' + PLAIN.encode()),
    ("header-only.csv", b"id,url,caption\n"),
    ("cr-header.csv", b"id,url,caption\r" + PLAIN.encode()),
    ("two-line-header.csv", b'url,caption,"no\r\nte"\r\n' + PLAIN.encode()),
    ("not-utf8.csv", b"id,url,caption\n" + PLAIN.encode() + b"q,http://img.test/\xff.jpg,c\xe9\n"
     + PLAIN.encode()),
    ("surrogate.csv", b"id,url,caption\n" + PLAIN.encode() + b"q,http://a.test/x,\xed\xa0\x80\n"),
])
def test_whole_files_read_alike(tmp_path: Path, name: str, content: bytes) -> None:
    source = tmp_path / name
    source.write_bytes(content)
    assert_readers_agree(source)


@pytest.mark.parametrize(("kind", "parsers"), [("quoted", {True}), ("nul", {True, False})])
def test_blocks_around_an_awkward_row_are_still_read_by_pyarrow(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, parsers: set[bool]) -> None:
    monkeypatch.setattr(plan, "BLOCK_BYTES", 256)
    parsed: list[bool] = []
    real = plan._plain_table

    def counted(block: bytes, width: int, delimiter: str) -> pa.Table | None:
        table = real(block, width, delimiter)
        parsed.append(table is not None)
        return table

    monkeypatch.setattr(plan, "_plain_table", counted)
    source = tmp_path / "in.csv"
    source.write_text("id,url,caption\r\n" + PLAIN + AWKWARD[kind] + PLAIN, newline="")
    assert_readers_agree(source)
    assert parsed[0] and parsed[-1] and set(parsed) == parsers
    assert parsed.count(False) <= 1  # the parser reads only the block with the awkward row


def test_a_long_row_after_plain_blocks_is_kept_as_read(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    source = tmp_path / "in.csv"
    long_caption = "x" * (plan.MAX_ROW_CHARS + 10)
    source.write_text("id,url,caption\n" + PLAIN + f"q,http://img.test/a.jpg,{long_caption}\n"
                      + PLAIN, newline="")
    spill = Spill(store, "r", "d")
    _, _, _, tables = plan.csv_tables(source, Settings(chunk_size=50), spill)
    rows = [r for t in tables for r in t.select(["row", "error"]).to_pylist()]
    assert len(rows) == 81
    assert rows[40] == {"row": 40, "error": "field_too_long"}
    assert store.exists(spill.key(40, "meta.json"))


TOKENS = ["a", "é", ",", "\t", '"', "\r", "\n", "\r\n", "\0", " ", "http://img.test/x.jpg",
          "\ufeff", "\u2028", "ftp://x", '"a,b"', '""', '"say ""hi"""', ',"q",', '"\n"']


@hypothesis_settings(max_examples=150, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.lists(st.sampled_from(TOKENS), max_size=6).map("".join), max_size=30),
       plain_lines=st.integers(0, 30), chunk_size=st.integers(1, 9),
       block=st.sampled_from([16, 64, 1 << 24]))
def test_random_files_read_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 lines: list[str], plain_lines: int, chunk_size: int,
                                 block: int) -> None:
    monkeypatch.setattr(plan, "BLOCK_BYTES", block)
    source = tmp_path / "random.csv"
    plain = "".join(PLAIN.splitlines(keepends=True)[:plain_lines])
    source.write_text("id,url,caption\r\n" + plain + "".join(lines), encoding="utf-8",
                      newline="")
    assert_readers_agree(source, chunk_size)
