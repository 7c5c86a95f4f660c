"""The per-chunk cache index: a chunk whose images and captions are all known reads one index per
stage, sends no request and loads no model; a missing or damaged index only costs reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from sim_pipeline.core.config import Settings
from sim_pipeline.core.layout import model_tag
from sim_pipeline.core.store import LocalStore
from sim_pipeline.stages.embed import images, texts
from sim_pipeline.stages.embed.encoders import vector_tag
from sim_pipeline.stages.embed.images import embed_images_chunk
from sim_pipeline.stages.embed.texts import embed_texts_chunk
from sim_pipeline.stages.fetch.chunk import fetch_chunk
from sim_pipeline.stages.known import fetched_key, vectors_key
from sim_pipeline.stages.plan import RunPlan, plan_csv
from sim_pipeline.stages.score import join_score_chunk
from tests.conftest import ImageServer
from tests.pairs import Case, serve_good_images, write_cases


class CountingStore(LocalStore):
    """A real folder store that remembers which keys were read."""

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self.reads: list[str] = []

    def read_bytes(self, key: str) -> bytes:
        self.reads.append(key)
        return super().read_bytes(key)


def planned(tmp_path: Path, settings: Settings, server: ImageServer, prefix: str
            ) -> tuple[CountingStore, RunPlan]:
    """Three chunks holding the same four images, captions and one refused URL."""
    urls = serve_good_images(server, 4, prefix=prefix)
    cases = [Case(u, f"caption {i}", None) for i, u in enumerate(urls)]
    source = write_cases(tmp_path / "pairs.csv", [*cases, Case("ftp://x.test/a", "c", None)] * 3)
    store = CountingStore(settings.store)
    return store, plan_csv(source, store, settings.replace(chunk_size=5), prefix)


def embedded(store: LocalStore, plan: RunPlan, index: int, settings: Settings) -> None:
    for stage in (fetch_chunk, embed_images_chunk, embed_texts_chunk):
        stage(plan.chunks[index], store, settings)


def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(images, "encoder_for", refuse)
    monkeypatch.setattr(texts, "encoder_for", refuse)


def test_a_chunk_of_known_images_and_captions_reads_one_index_per_stage(
        tmp_path: Path, settings: Settings, image_server: ImageServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    store, plan = planned(tmp_path, settings, image_server, "known")
    first, second = plan.chunks[:2]
    embedded(store, plan, 0, settings)
    requests = image_server.total_requests()
    store.reads.clear()
    no_model(monkeypatch)
    embedded(store, plan, 1, settings)

    assert image_server.total_requests() == requests
    assert not [key for key in store.reads if key.startswith(("images/", "embeddings/"))]
    tag = vector_tag(settings)
    vector_index = [vectors_key(first, kind, tag) + part for kind in ("images", "texts")
                    for part in (".json", ".npy")]  # an index: its keys, then its vectors
    assert sorted(set(store.reads)) == sorted(
        {second.rows_key, fetched_key(first), fetched_key(second), *vector_index})
    scored = [list(join_score_chunk(chunk, store, settings)) for chunk in (first, second)]
    assert [(s.similarity, s.error) for s in scored[0]] == \
        [(s.similarity, s.error) for s in scored[1]]
    assert [s.error for s in scored[1]] == [None] * 4 + ["unsupported_scheme"]


def test_a_damaged_or_missing_index_costs_reads_not_results(
        tmp_path: Path, settings: Settings, image_server: ImageServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    store, plan = planned(tmp_path, settings, image_server, "damaged-index")
    first, second, third = plan.chunks
    embedded(store, plan, 0, settings)
    embedded(store, plan, 1, settings)
    tag = vector_tag(settings)
    Path(store.uri(fetched_key(second))).write_bytes(b"not an index")
    Path(store.uri(vectors_key(second, "texts", tag) + ".npy")).write_bytes(b"\0" * 64)
    store.delete(vectors_key(second, "images", tag) + ".json")
    store.reads.clear()
    no_model(monkeypatch)  # the per-key caches still hold every vector
    embedded(store, plan, 2, settings)

    assert len([k for k in store.reads if k.startswith("embeddings/")]) == 4 + 4
    results = [list(join_score_chunk(c, store, settings)) for c in (first, third)]
    assert [s.similarity for s in results[0]] == [s.similarity for s in results[1]]
    assert store.exists(f"{third.prefix}/image-embeddings.{model_tag(settings.model, 'fp32')}"
                        ".json")
