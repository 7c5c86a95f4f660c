"""``score_pairs``: a streaming Python API over the same stages."""

from __future__ import annotations

from collections.abc import Iterator

from sim_pipeline import ScoredRow, score_pairs
from sim_pipeline.core.config import Settings
from tests.conftest import ImageServer
from tests.pairs import serve_good_images


def test_results_stream_in_order_from_a_generator(settings: Settings,
                                                  image_server: ImageServer) -> None:
    urls = serve_good_images(image_server, 5, prefix="api")
    consumed = []

    def pairs() -> Iterator[tuple[str, str]]:
        for i in range(23):
            consumed.append(i)
            yield urls[i % 5], f"caption {i}"

    results = score_pairs(pairs(), settings, group_size=10)
    first = next(results)
    assert isinstance(first, ScoredRow) and first.row == 0
    assert len(consumed) == 10, "only the first group is read before the first result"
    rest = list(results)
    assert [r.row for r in [first, *rest]] == list(range(23))
    assert [r.caption for r in rest[:2]] == ["caption 1", "caption 2"]
    assert all(r.error is None and 0 <= r.similarity <= 1 for r in [first, *rest])


def test_bad_pairs_get_codes_and_mappings_are_accepted(settings: Settings,
                                                        image_server: ImageServer) -> None:
    (url,) = serve_good_images(image_server, 1, prefix="api-bad")
    pairs = [{"url": url, "caption": "fine"}, {"url": url, "caption": " "},
             ("gopher://x.test/a", "cap"), {"url": None, "caption": "cap"}]
    codes = [r.error for r in score_pairs(pairs, settings)]
    assert codes == [None, "missing_caption", "unsupported_scheme", "invalid_url"]


def test_a_repeated_group_costs_no_requests(settings: Settings, image_server: ImageServer) -> None:
    urls = serve_good_images(image_server, 3, prefix="api-repeat")
    pairs = [(u, "same caption") for u in urls]
    first = list(score_pairs(pairs, settings))
    before = image_server.total_requests()
    assert list(score_pairs(pairs, settings)) == first
    assert image_server.total_requests() == before
