"""The columnar data path gives what the row-by-row one gave: the same scored CSV bytes, the same
rounding, the same JSON and the same table rows, whatever the values hold."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pyarrow as pa
import pytest
import sqlalchemy as sa

from sim_pipeline.core.layout import sha256_hex
from sim_pipeline.results.db import ResultsDB, _json, json_lists, similarity_scores
from sim_pipeline.results.scored_csv import RowWriter, scored_fields, similarity_text
from sim_pipeline.stages.embed.sets import EmbeddingSet
from sim_pipeline.stages.plan import ChunkColumns, normalise_row
from sim_pipeline.stages.score import (
    ScoredChunk,
    rounded,
    score_columns,
    score_rows,
    similarity_from_cosine,
)

TRICKY = ["", "plain", "a,b", "a\tb", 'say "hi"', '"', "line\nbreak", "cr\ronly", "crlf\r\n",
          "nul\0byte", "\\back\\slash", "\x01\x1f controls \x7f", "é ü 😀 \u2028 \u0085", " pad ",
          "\b\f", ",", "\n", "\r"]


def tricky_rows(count: int, seed: int = 7) -> list[list[str]]:
    pick = random.Random(seed)
    return [[pick.choice(TRICKY) + pick.choice(TRICKY) for _ in range(3)] for _ in range(count)]


@pytest.mark.parametrize("delimiter", [",", "\t"])
def test_a_chunk_written_from_columns_has_the_bytes_of_rows_written_one_by_one(
        delimiter: str) -> None:
    fields = tricky_rows(400)
    pick = random.Random(3)
    similarity = [None if i % 5 == 0 else round(pick.random(), 4) for i in range(400)]
    similarity[1:4] = [0.0, 1.0, 0.00005]
    similarity[3] = round(similarity[3], 4)
    error = [None if s is not None else pick.choice(["http_404", "missing_caption"])
             for s in similarity]
    by_rows, by_columns = io.StringIO(newline=""), io.StringIO(newline="")
    one_by_one = RowWriter(by_rows, delimiter)
    for values, score, code in zip(fields, similarity, error, strict=True):
        one_by_one.writerow(scored_fields(values, score, code))
    RowWriter(by_columns, delimiter).write_columns(
        pa.array(fields, pa.list_(pa.string())), pa.array(similarity, pa.float64()),
        pa.array(error, pa.string()))
    assert by_columns.getvalue() == by_rows.getvalue()


def test_similarity_digits_are_those_python_prints() -> None:
    values = [round(v, 4) for v in np.random.default_rng(1).random(20_000)] + [0.0, 1.0, 0.5]
    texts = similarity_text(pa.array(values, pa.float64())).to_pylist()
    assert texts == [f"{v:.4f}" for v in values]


def test_array_rounding_is_pythons_rounding_even_at_ties() -> None:
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.uniform(-1, 1, 50_000),
                             (np.arange(-20_000, 20_000) + 0.5) / 10_000,  # decimal ties
                             (np.arange(-20_000, 20_000) + 0.5) / 1_000_000])
    for digits in (4, 6):
        assert rounded(values, digits).tolist() == [round(float(v), digits) for v in values]


def test_input_fields_json_is_what_json_dumps_writes() -> None:
    fields = tricky_rows(300) + [[]]
    columns = json_lists(pa.array(fields, pa.list_(pa.string()))).to_pylist()
    assert columns == [_json(values) for values in fields]
    assert [json.loads(text) for text in columns[:5]] == \
        [[v.replace("\0", "\ufffd") for v in values] for values in fields[:5]]


def embedding_set(keys: list[str], errors: dict[str, str], seed: int) -> EmbeddingSet:
    vectors = np.random.default_rng(seed).normal(size=(len(keys), 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return EmbeddingSet(keys, vectors, errors)


def chunk_of(count: int) -> tuple[pa.Table, EmbeddingSet, EmbeddingSet, list]:
    """A chunk with input errors and failed images, its two embedding sets, its rows."""
    rows = [normalise_row(i, f"http://img.test/{i % 13}.jpg" if i % 11 else "ftp://x/y",
                          f"caption {i % 7}" if i % 17 else "", [str(i)]) for i in range(count)]
    columns = ChunkColumns()
    for row in rows:
        columns.add_row(row)
    table = columns.table()
    url_hashes = sorted({r.url_hash for r in rows if r.error is None})
    captions = sorted({sha256_hex(r.caption) for r in rows if r.error is None})
    images = embedding_set(url_hashes, {url_hashes[0]: "http_404"}, 1)
    return table, images, embedding_set(captions, {}, 2), rows


def test_a_chunk_scored_as_arrays_scores_each_row_as_before() -> None:
    table, images, texts, rows = chunk_of(500)
    scored = ScoredChunk(table, score_columns(table, images, texts))
    expected = list(score_rows(rows, images, texts))
    assert list(scored) == expected
    assert {s.error for s in expected} == {None, "http_404", "unsupported_scheme",
                                           "missing_caption"}
    assert scored.ok == sum(1 for s in expected if s.error is None)
    assert all(s.similarity == similarity_from_cosine(s.cosine) for s in expected if s.cosine)


def test_rows_copied_from_columns_are_the_rows_upserted_one_by_one(pg_url: str) -> None:
    db = ResultsDB(pg_url)
    table, images, texts, _ = chunk_of(300)
    scored = ScoredChunk(table, score_columns(table, images, texts))
    weird = ChunkColumns()
    for values in tricky_rows(50):
        weird.add_row(normalise_row(1000 + len(weird.rows), "http://img.test/" + values[0],
                                    values[1], values))
    weird_table = weird.table()
    weird_results = pa.table({"similarity": pa.nulls(50, pa.float64()),
                              "cosine": pa.nulls(50, pa.float64()),
                              "error": pa.array(["invalid_url"] * 50)})
    for run_id in ("by-columns", "by-rows"):
        db.start_run(run_id, "in.csv", "m", 1050)
    db.upsert_score_columns("by-columns", "m", table, scored.results)
    db.upsert_score_columns("by-columns", "m", weird_table, weird_results)
    db.bulk_copy = False  # the row-by-row INSERT path
    db.upsert_score_columns("by-rows", "m", table, scored.results)
    db.upsert_score_columns("by-rows", "m", weird_table, weird_results)
    db.bulk_copy = True
    db.upsert_score_columns("by-columns", "m", table, scored.results)  # again: replaces

    columns = [c for c in similarity_scores.columns if c.name not in ("run_id", "scored_at")]
    with db.engine.connect() as conn:
        found = {run_id: conn.execute(sa.select(*columns).where(
            similarity_scores.c.run_id == run_id).order_by(similarity_scores.c.row_number)).all()
            for run_id in ("by-columns", "by-rows")}
    assert len(found["by-columns"]) == 350
    assert found["by-columns"] == found["by-rows"]
