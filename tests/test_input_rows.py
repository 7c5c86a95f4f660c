"""One bad row costs one row: whatever a UTF-8 text file holds, every row comes back classified.

Each case runs the real CLI (plan, fetch from the loopback image server, the tiny random-weight
model, join-score, finalize) into SQLite and PostgreSQL; scores of random weights are
meaningless, only their presence is checked. A property-based test generates the files.
"""

from __future__ import annotations

import asyncio
import csv
import io
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from sim_pipeline.core import errors
from sim_pipeline.core.config import Settings
from sim_pipeline.core.store import LocalStore
from sim_pipeline.core.urls import UnknownHost, url_problem
from sim_pipeline.stages.fetch.guard import system_resolver
from sim_pipeline.stages.plan import normalise_row, read_chunk_rows, write_chunks
from tests.conftest import ImageServer, Route
from tests.pairs import read_csv, serve_good_images
from tests.test_score_cli import score

HEADER = ["id", "url", "caption", "notes"]
LONG_LABEL_HOST = "a" * 64 + ".example.com"


@pytest.fixture(scope="module")
def good_urls(image_server: ImageServer) -> list[str]:
    return serve_good_images(image_server, 3, prefix="input-rows")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """The test's settings, writing to SQLite or to the throwaway PostgreSQL database."""
    if request.param == "sqlite":
        return settings
    return settings.replace(database_url=request.getfixturevalue("pg_url"))


def csv_bytes(rows: list[list[str]], header: list[str] = HEADER) -> bytes:
    """CRLF line ends: with LF alone Python's writer would leave a CR in a value unquoted."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerows([header, *rows])
    return buffer.getvalue().encode("utf-8")


def run_cli(path: Path, settings: Settings, *extra: str) -> list[list[str]]:
    """Score ``path`` with a run id of its own; the scored CSV's rows, header included."""
    assert score(path, settings, "--run-id", path.stem, "-o", str(path.with_suffix(".out")),
                 *extra) == 0
    return read_csv(path.with_suffix(".out"))


def table_rows(settings: Settings, run_id: str) -> list[tuple]:
    engine = sa.create_engine(settings.database_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT row_number, image_url, caption, similarity, error, input_fields "
            "FROM similarity_scores WHERE run_id = :run ORDER BY row_number"),
            {"run": run_id}).all()
    engine.dispose()
    return [tuple(r) for r in rows]


def outcome(row: list[str]) -> str:
    """``scored`` or the row's code; a row has exactly one of the two."""
    similarity, error = row[-2:]
    assert bool(similarity) != bool(error), row
    if similarity:
        assert 0.0 <= float(similarity) <= 1.0
        return "scored"
    assert errors.describe(error) is not None, error
    return error


def test_nul_in_a_caption_is_scored_as_written_and_stored_as_u_fffd_early_or_late(
        tmp_path: Path, db_settings: Settings, good_urls: list[str]) -> None:
    padding = [[f"pad-{i}", "not a url", "padding " * 12, ""] for i in range(800)]
    rows = [["early", good_urls[0], "a cat\0 on a mat", "n\0te"], *padding,
            ["late", good_urls[1], "a dog\0 in the snow", ""],
            ["nul-url", good_urls[2] + "\0", "caption", ""]]
    source = tmp_path / "nul.csv"
    source.write_bytes(csv_bytes(rows))
    assert source.read_bytes().index(b"\0", 200) > 65536  # "late" is past the first 64 KB

    output = run_cli(source, db_settings)
    assert len(output) == len(rows) + 1
    assert [r[:-2] for r in output[1:]] == rows  # the scored CSV keeps the NUL bytes
    assert [outcome(r) for r in (output[1], output[-2], output[-1])] == [
        "scored", "scored", "invalid_url"]
    stored = table_rows(db_settings, "nul")
    assert len(stored) == len(rows)
    assert stored[0][2] == "a cat\ufffd on a mat"  # PostgreSQL holds no NUL: U+FFFD says so
    assert stored[0][5] == '["early","' + good_urls[0] + '","a cat\ufffd on a mat","n\ufffdte"]'
    assert stored[-1][1] == good_urls[2] + "\ufffd" and stored[-1][4] == "invalid_url"


def test_bytes_that_are_not_utf8_cost_only_their_row(
        tmp_path: Path, db_settings: Settings, good_urls: list[str]) -> None:
    lines = [b"id,url,caption,notes",
             b"0," + good_urls[0].encode() + b",caf\xe9 au lait,",
             b"1," + good_urls[1].encode() + b",a fine caption,latin-1 \xe9t\xe9",
             b"2," + good_urls[2].encode() + b"\xff,a caption,",
             b"3," + good_urls[0].encode() + b",truncated \xe2\x82,",
             b"4," + good_urls[1].encode() + b",an ordinary row,"]
    source = tmp_path / "bytes.csv"
    source.write_bytes(b"\n".join(lines) + b"\n")

    output = run_cli(source, db_settings)
    assert [outcome(r) for r in output[1:]] == [
        "invalid_encoding", "scored", "invalid_encoding", "invalid_encoding", "scored"]
    assert output[1][2] == "caf\ufffd au lait"
    assert output[2][3] == "latin-1 \ufffdt\ufffd"
    assert output[4][2] == "truncated \ufffd\ufffd"  # one U+FFFD per byte
    assert [r[0] for r in table_rows(db_settings, "bytes")] == list(range(5))


def test_line_separators_and_carriage_returns_change_nothing_but_their_row(
        tmp_path: Path, db_settings: Settings, good_urls: list[str]) -> None:
    rows = [["0", good_urls[0], "line\u2028separator", "para\u2029graph"],
            ["1", good_urls[1], "next\u0085line", "\u2028"],
            ["2", good_urls[2] + "\u2028x", "a caption", ""],
            ["3", good_urls[0], "\u2029", ""],
            ["4", good_urls[1], "carriage\rreturn", "a lone\rCR"]]  # quoted in the output
    source = tmp_path / "separators.csv"
    source.write_bytes(csv_bytes(rows))

    output = run_cli(source, db_settings)
    assert [r[:-2] for r in output[1:]] == rows
    assert [outcome(r) for r in output[1:]] == [
        "scored", "scored", "invalid_url", "missing_caption", "scored"]
    first = (tmp_path / "separators.out").read_bytes()
    assert run_cli(source, db_settings) == output  # a rerun reads the stored chunks back
    assert (tmp_path / "separators.out").read_bytes() == first


def test_chunks_keep_every_value_whatever_it_holds(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    weird = "\u2028\u2029\u0085\x1c\x1d\x1e\r\n\0\ud800"
    rows = [normalise_row(i, f"http://h.test/{i}{weird}", f"c{weird}{i}", [weird, "x"])
            for i in range(3)]
    (chunk,) = write_chunks(store, "run", "digest", rows, 10)
    assert chunk.rows == 3
    assert read_chunk_rows(store, chunk) == rows
    assert rows[0].fields[0] == weird.replace("\ud800", "\ufffd")
    assert rows[0].caption == f"c{weird}0".replace("\ud800", "\ufffd")  # as written
    assert rows[0].error == "invalid_encoding"


def test_a_host_label_over_63_characters_is_an_invalid_url_not_a_crash(
        tmp_path: Path, settings: Settings, image_server: ImageServer,
        good_urls: list[str]) -> None:
    assert url_problem(f"http://{LONG_LABEL_HOST}/x.jpg") == "invalid_url"
    assert url_problem(f"http://{'a' * 63}.example.com/x.jpg") is None
    with pytest.raises(UnknownHost) as refused:
        asyncio.run(system_resolver(LONG_LABEL_HOST, 80))
    assert isinstance(refused.value.__context__, UnicodeError)  # refused before any DNS query
    hop = image_server.add("/input-rows/to-long-label", Route(
        302, b"", "text/plain", headers={"Location": f"http://{LONG_LABEL_HOST}/x.jpg"}))
    rows = [["0", f"http://{LONG_LABEL_HOST}/x.jpg", "a caption", ""],
            ["1", hop, "a caption", ""], ["2", good_urls[0], "a caption", ""]]
    source = tmp_path / "labels.csv"
    source.write_bytes(csv_bytes(rows))
    output = run_cli(source, settings)
    assert [outcome(r) for r in output[1:]] == ["invalid_url", "invalid_url", "scored"]


def test_a_17_mb_field_costs_its_row_not_the_file(
        tmp_path: Path, settings: Settings, good_urls: list[str]) -> None:
    huge = "a very long caption, " + "x" * (17 * 1024 * 1024) + "\nwith a line break"
    rows = [["0", good_urls[0], "before", ""], ["1", good_urls[1], huge, "note"],
            ["2", good_urls[2], "after", "kept"]]
    source = tmp_path / "huge.csv"
    source.write_bytes(csv_bytes(rows))
    output = run_cli(source, settings)
    assert [outcome(r) for r in output[1:]] == ["scored", "field_too_long", "scored"]
    assert output[2][:-2] == ["", "", "", ""]
    assert output[3][:-2] == rows[2]


def test_an_unclosed_quote_costs_the_rows_it_swallows(
        tmp_path: Path, settings: Settings, good_urls: list[str]) -> None:
    source = tmp_path / "quote.csv"
    source.write_text(f'id,url,caption,notes\n0,{good_urls[0]},fine,\n'
                      f'1,{good_urls[1]},"never closed,\n2,{good_urls[2]},swallowed,\n',
                      encoding="utf-8")
    output = run_cli(source, settings)
    assert [outcome(r) for r in output[1:]] == ["scored", "scored"]
    assert output[2][2] == f"never closed,\n2,{good_urls[2]},swallowed,\n"


@pytest.mark.parametrize(("content", "reason"), [
    (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)) * 8, "first line holds binary data"),
    ("url,caption\nhttp://a.test/x.jpg,a cat\n".encode("utf-16-le"), "first line"),
    ("url,caption\nhttp://a.test/x.jpg,a cat\n".encode("utf-16"), "UTF-16 text"),
    (b"url,caption\n" + bytes((i * 7919) % 256 for i in range(8192)), "is binary data"),
    (b"\xff\xd8\xff\xe0\0\x10JFIF\0", "first line holds binary data"),
])
def test_a_file_that_is_no_csv_is_refused_up_front_in_one_sentence(
        tmp_path: Path, settings: Settings, capsys: pytest.CaptureFixture[str],
        content: bytes, reason: str) -> None:
    source = tmp_path / "input.csv"
    source.write_bytes(content)
    capsys.readouterr()
    assert score(source, settings) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a CSV file" in err and reason in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "input_scored.csv").exists()


# --- generated files -------------------------------------------------------------------------

ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
NASTY = st.sampled_from(["\0", "\u2028", "\u2029", "\u0085", "\r", "\n", "\r\n", '"', ",",
                         "\ufeff", "\x1c", "\t", " ", "\ufffd", "\U0010ffff"])
FIELD = st.lists(st.one_of(ANY_TEXT, NASTY), max_size=4).map("".join)
QUOTING = st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC])
EXAMPLES = 12  # each is a whole CLI run (~1 s); the same examples every time (derandomized)


@st.composite
def url_values(draw: st.DrawFn, good: list[str], server: ImageServer) -> str:
    """Served images, the same with junk appended, missing paths, and junk: loopback only."""
    return draw(st.one_of(
        st.sampled_from(good),
        st.builds(lambda u, t: u + t, st.sampled_from(good), FIELD),
        st.builds(lambda t: server.url("/input-rows/missing/") + t, FIELD),
        FIELD,
    ))


@st.composite
def csv_files(draw: st.DrawFn, good: list[str], server: ImageServer
              ) -> tuple[bytes, list[list[str]]]:
    """A UTF-8 CSV of 1-6 rows of any shape (short, long, blank) and its rows as Python's csv
    reader reads them back (the writer leaves a lone CR unquoted, so the two can differ)."""
    rows = []
    for i in range(draw(st.integers(1, 6))):
        row = [str(i), draw(url_values(good, server)), draw(FIELD), draw(FIELD)]
        rows.append(row[:draw(st.integers(0, 4))] + draw(st.lists(FIELD, max_size=2)))
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, quoting=draw(QUOTING),
                        lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
    writer.writerows([HEADER, *rows])
    text = buffer.getvalue()
    return text.encode("utf-8"), list(csv.reader(io.StringIO(text, newline="")))[1:]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_any_utf8_csv_comes_back_with_every_row_classified(
        tmp_path: Path, settings: Settings, image_server: ImageServer, good_urls: list[str],
        database: str, request: pytest.FixtureRequest) -> None:
    url = settings.database_url if database == "sqlite" else request.getfixturevalue("pg_url")
    runs = iter(range(1_000_000))

    @hypothesis_settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                         suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                HealthCheck.too_slow])
    @given(csv_files(good_urls, image_server))
    def check(file: tuple[bytes, list[list[str]]]) -> None:
        content, rows = file
        source = tmp_path / f"generated-{next(runs)}.csv"
        source.write_bytes(content)
        output = run_cli(source, settings.replace(database_url=url))
        assert output[0] == [*HEADER, "similarity", "error"]
        assert len(output) == len(rows) + 1
        for read, back in zip(rows, output[1:], strict=True):
            assert back[:-2] == (read + [""] * len(HEADER))[:len(HEADER)]
            outcome(back)
        stored = table_rows(settings.replace(database_url=url), source.stem)
        assert [r[0] for r in stored] == list(range(len(rows)))

    check()
