"""``sim-pipeline serve`` as a real process on loopback: the same answers as the CLI, batching,
refusals under pressure, API keys, readiness, draining on SIGTERM, metrics. The model is a tiny
random-weight CLIP: its scores are meaningless, only their equality with the CLI's matters.
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from sim_pipeline.core.errors import UserError
from sim_pipeline.core.layout import sha256_hex
from sim_pipeline.stages.embed.remote import (
    InferenceClient,
    remote_image_vectors,
    remote_text_vectors,
)
from tests.conftest import ImageServer, Route, make_image
from tests.pairs import mixed_cases, read_csv, serve_good_images, write_cases
from tests.support.tcp_proxy import PortProxy

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class ServeProcess:
    """``python -m sim_pipeline.cli serve ...`` in a subprocess, its output in a log file."""

    def __init__(self, tmp: Path, model: Path, allow_hosts: str, *extra: str,
                 host: str = "127.0.0.1", database_url: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.host, self.port, self.log = host, free_port(host), tmp / "serve.log"
        self.model = str(model)
        self.store = tmp / "store"
        self.database_url = database_url or f"sqlite:///{tmp / 'results.db'}"
        args = ["serve", "--host", host, "--port", str(self.port), "--model", str(model),
                "--store", str(self.store), "--database-url", self.database_url,
                "--device", "cpu", "--precision", "fp32", "--fetch-timeout", "3",
                "--allow-hosts", allow_hosts, *extra]
        self.command = [sys.executable, "-m", "sim_pipeline.cli", *args]
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait_for: str = "/readyz") -> ServeProcess:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(self.url(wait_for), timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"the service did not start: {self.log.read_text()[-3000:]}")

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def post(self, path: str, payload: object, **kwargs: object) -> httpx.Response:
        return httpx.post(self.url(path), json=payload, timeout=60, **kwargs)

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def metric_samples(server: ServeProcess, **kwargs: object) -> dict[tuple, float]:
    """``{(sample name, sorted labels): value}`` as ``prometheus_client``'s parser reads them."""
    text = httpx.get(server.url("/metrics"), timeout=10, **kwargs).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path,
           image_server: ImageServer) -> Iterator[ServeProcess]:
    """The shared service: up to 64 pairs and 300 KB per request, batches of 8 within 50 ms."""
    process = ServeProcess(tmp_path_factory.mktemp("serve"), tiny_model,
                           image_server.allow_hosts, "--max-items", "64", "--max-queue", "256",
                           "--max-body-bytes", "300000", "--max-batch-size", "8",
                           "--max-wait-ms", "50").start()
    yield process
    process.stop()


def cli_score(tmp: Path, model: Path, allow_hosts: str, source: Path) -> list[list[str]]:
    output = tmp / "scored.csv"
    done = subprocess.run(
        [sys.executable, "-m", "sim_pipeline.cli", "score", str(source), "-o", str(output),
         "--quiet", "--model", str(model), "--store", str(tmp / "cli-store"),
         "--database-url", f"sqlite:///{tmp / 'cli.db'}", "--device", "cpu",
         "--precision", "fp32", "--fetch-timeout", "3", "--allow-hosts", allow_hosts],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return read_csv(output)


def test_score_gives_the_cli_answers_and_records_them(
        server: ServeProcess, image_server: ImageServer, tiny_model: Path,
        tmp_path: Path) -> None:
    cases = mixed_cases(image_server, prefix="serve-parity")
    expected = cli_score(tmp_path, tiny_model, image_server.allow_hosts,
                         write_cases(tmp_path / "pairs.csv", cases))[1:]

    answer = server.post("/v1/score", {"record": True, "pairs": [
        {"url": c.url, "caption": c.caption} for c in cases]})

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == str(tiny_model)
    assert body["run_id"] == f"serve-{datetime.now(UTC):%Y%m%d}"
    results = body["results"]
    assert len(results) == len(cases) == len(expected)
    for case, row, result in zip(cases, expected, results, strict=True):
        similarity, error = row[-2:]
        assert result["error"] == (error or None) == case.expected_error, case
        if error:
            assert result["similarity"] is result["cosine"] is None
        else:  # same bytes, same model; batches differ, so float noise below the 4th decimal
            assert result["similarity"] == pytest.approx(float(similarity), abs=1e-4)
            assert result["similarity"] == round((result["cosine"] + 1) / 2, 4)

    engine = sa.create_engine(server.database_url)
    with engine.connect() as conn:
        stored = conn.execute(sa.text(
            "SELECT image_url, caption, similarity, error FROM similarity_scores "
            "WHERE run_id = :run ORDER BY row_number"), {"run": body["run_id"]}).all()
        status = conn.execute(sa.text("SELECT status, source FROM scoring_runs WHERE run_id = "
                                      ":run"), {"run": body["run_id"]}).one()
    engine.dispose()
    assert [(r.image_url, r.similarity, r.error) for r in stored[-len(cases):]] == [
        (c.url.strip(), r["similarity"], r["error"]) for c, r in zip(cases, results, strict=True)]
    assert tuple(status) == ("running", "sim-pipeline serve")


def test_concurrent_clients_each_get_their_own_pairs_in_batches(
        server: ServeProcess, image_server: ImageServer) -> None:
    urls = serve_good_images(image_server, 12, prefix="serve-concurrent")
    missing = image_server.url("/serve-concurrent/missing.jpg")
    requests = [[{"url": url, "caption": f"picture {i}"}] + (
        [{"url": missing, "caption": f"gone {i}"}] if i % 3 == 0 else [])
        for i, url in enumerate(urls)]
    before = metric_samples(server)

    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda pairs: server.post("/v1/score", {"pairs": pairs}),
                                requests))

    everything = server.post("/v1/score", {"pairs": [p for r in requests for p in r]}).json()
    expected = iter(everything["results"])  # the same pairs again, one request, from the cache
    for pairs, answer in zip(requests, answers, strict=True):
        assert answer.status_code == 200, answer.text
        assert answer.json()["results"] == [next(expected) for _ in pairs]
        assert [r["error"] for r in answer.json()["results"]] == [None, "http_404"][:len(pairs)]
    after = metric_samples(server)
    key = ("sim_serve_batch_size_count", (("tower", "text"),))
    passes = after[key] - before.get(key, 0)
    assert 1 <= passes < len(requests) + 4  # 16 captions took fewer forward passes: batched


@pytest.fixture
def small_server(tmp_path: Path, tiny_model: Path,
                 image_server: ImageServer) -> Iterator[ServeProcess]:
    """Two items in flight at most."""
    process = ServeProcess(tmp_path, tiny_model, image_server.allow_hosts, "--max-items", "2",
                           "--max-queue", "2", "--fetch-timeout", "10").start()
    yield process
    process.stop()


def wait_until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_a_full_queue_answers_503_with_retry_after(
        small_server: ServeProcess, image_server: ImageServer) -> None:
    slow = [image_server.add(f"/serve-queue/slow-{i}.jpg",
                             Route(body=make_image(seed=70 + i), delay=2.0)) for i in range(2)]
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(small_server.post, "/v1/score",
                            {"pairs": [{"url": u, "caption": "slow"} for u in slow]})
        wait_until(lambda: image_server.requests["/serve-queue/slow-0.jpg"] >= 1)

        refused = small_server.post("/v1/score", {"pairs": [{"url": slow[0], "caption": "x"}]})

        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert "capacity" in refused.json()["detail"]
        assert first.result().status_code == 200
    assert small_server.post("/v1/embed/texts", {"texts": ["room again"]}).status_code == 200


def test_sigterm_lets_requests_in_flight_finish_then_exits(
        small_server: ServeProcess, image_server: ImageServer) -> None:
    slow = image_server.add("/serve-drain/slow.jpg", Route(body=make_image(seed=90), delay=2.0))
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(small_server.post, "/v1/score",
                                {"pairs": [{"url": slow, "caption": "drained"}]})
        wait_until(lambda: image_server.requests["/serve-drain/slow.jpg"] >= 1)
        assert small_server.process is not None
        small_server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)

        with pytest.raises(httpx.TransportError):  # no new connections while draining
            httpx.get(small_server.url("/healthz"), timeout=2)
        answer = in_flight.result()

    assert answer.status_code == 200
    assert answer.json()["results"][0]["similarity"] is not None
    assert small_server.process.wait(timeout=30) == 0
    assert "Application shutdown complete" in small_server.log.read_text()


def test_a_non_loopback_bind_needs_an_api_key(tmp_path: Path, tiny_model: Path,
                                               image_server: ImageServer) -> None:
    refused = subprocess.run([sys.executable, "-m", "sim_pipeline.cli", "serve", "--host",
                              "127.0.0.2", "--model", str(tiny_model)], cwd=ROOT, timeout=120,
                             capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items()
                                  if k != "SIM_PIPELINE_API_KEYS"})
    assert refused.returncode == 2
    assert "SIM_PIPELINE_API_KEYS" in refused.stderr and "Traceback" not in refused.stderr

    keyed = ServeProcess(tmp_path, tiny_model, image_server.allow_hosts, host="127.0.0.2",
                         env={"SIM_PIPELINE_API_KEYS": "first-key, second-key"}).start()
    try:
        texts = {"texts": ["a key was needed"]}
        assert keyed.post("/v1/embed/texts", texts).status_code == 401
        wrong = keyed.post("/v1/embed/texts", texts, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert httpx.get(keyed.url("/metrics")).status_code == 401
        bearer = keyed.post("/v1/embed/texts", texts,
                            headers={"Authorization": "Bearer second-key"})
        header = keyed.post("/v1/embed/texts", texts, headers={"X-API-Key": "first-key"})
        assert bearer.status_code == header.status_code == 200
        assert bearer.json() == header.json()
        assert httpx.get(keyed.url("/healthz")).status_code == 200  # probes stay open
    finally:
        keyed.stop()


@pytest.mark.parametrize(("body", "headers", "status", "says"), [
    (b'{"pairs": [', {"content-type": "application/json"}, 422, "not valid JSON"),
    (b'{"pairs": []}', {"content-type": "text/plain"}, 422, "Content-Type: application/json"),
    (b'{"pairs": [{"url": "http://a.test/x.jpg"}]}', {"content-type": "application/json"},
     422, "pairs.0.caption: Field required"),
    (b'{"pairs": [{"url": "u", "caption": "c"}], "recrod": true}',
     {"content-type": "application/json"}, 422, "recrod: Extra inputs are not permitted"),
    (b'{"pairs": [' + b",".join([b'{"url": "u", "caption": "c"}'] * 65) + b"]}",
     {"content-type": "application/json"}, 422, "at most 64 pairs"),
    (b'{"pairs": [{"url": "u", "caption": "' + b"x" * 300_001 + b'"}]}',
     {"content-type": "application/json"}, 413, "300000 bytes"),
])
def test_bad_requests_get_one_sentence(server: ServeProcess, body: bytes,
                                       headers: dict[str, str], status: int, says: str) -> None:
    answer = httpx.post(server.url("/v1/score"), content=body, headers=headers, timeout=30)

    assert answer.status_code == status, answer.text
    detail = answer.json()["detail"]
    assert says in detail and detail.endswith(".") and "\n" not in detail


def test_an_oversize_body_without_a_length_is_refused_as_it_arrives(
        server: ServeProcess) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"texts": ["'
        for _ in range(40):
            yield b"y" * 10_000
        yield b'"]}'

    answer = httpx.post(server.url("/v1/embed/texts"), content=chunks(), timeout=30,
                        headers={"content-type": "application/json"})

    assert answer.status_code == 413


@pytest.mark.parametrize(("image", "says"), [
    ({"key": "images/../../etc/passwd"}, "must look like images/"),
    ({"key": "images/ab/ab" + "0" * 62}, "is not a fetched image"),
    ({"data": "not base64!"}, "not valid base64"),
    ({"data": "aGk=", "key": "images/x"}, "exactly one of data and key"),
])
def test_bad_image_inputs_get_422(server: ServeProcess, image: dict[str, str],
                                  says: str) -> None:
    answer = server.post("/v1/embed/images", {"images": [image]})

    assert answer.status_code == 422
    assert says in answer.json()["detail"]


def test_a_private_address_is_refused_without_a_connection(server: ServeProcess) -> None:
    outsider = ImageServer()  # on loopback too, but not in the service's allowlist
    outsider.thread.start()
    try:
        url = outsider.add("/private.jpg", Route(body=make_image(seed=5)))
        answer = server.post("/v1/score", {"pairs": [{"url": url, "caption": "internal"}]})
    finally:
        outsider.httpd.shutdown()
        outsider.httpd.server_close()

    assert answer.json()["results"] == [{"similarity": None, "cosine": None,
                                         "error": "blocked_address"}]
    assert outsider.total_requests() == 0


def unpack(embedding: dict[str, object]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(str(embedding["vector_base64"])), dtype="<f4")


def test_embeddings_by_bytes_and_by_key_agree_with_score(
        server: ServeProcess, image_server: ImageServer) -> None:
    body = make_image(seed=4242, fmt="PNG")
    url = image_server.add("/serve-embed/one.png", Route(body=body, content_type="image/png"))
    scored = server.post("/v1/score", {"pairs": [{"url": url, "caption": "a red square"}]})
    key = f"images/{sha256_hex(url)[:2]}/{sha256_hex(url)}"
    images = [{"data": base64.b64encode(body).decode()}, {"key": key},
              {"data": base64.b64encode(b"GIF89a broken").decode()}]

    floats = server.post("/v1/embed/images", {"images": images}).json()
    packed = server.post("/v1/embed/images", {"images": images, "encoding": "base64"}).json()
    text = server.post("/v1/embed/texts", {"texts": ["a red square"], "encoding": "base64"})

    by_bytes, by_key = (np.array(e["vector"], dtype=np.float32) for e in floats["embeddings"][:2])
    assert floats["dimensions"] == len(by_bytes) and floats["model"] == packed["model"]
    assert np.array_equal(by_bytes, by_key) and np.array_equal(by_bytes,
                                                               unpack(packed["embeddings"][0]))
    assert abs(float(np.linalg.norm(by_bytes)) - 1.0) < 1e-5
    assert floats["embeddings"][2] == {"vector": None, "vector_base64": None,
                                       "error": "decode_error"}
    cosine = float(np.dot(by_bytes.astype(np.float64),
                          unpack(text.json()["embeddings"][0]).astype(np.float64)))
    assert scored.json()["results"][0]["cosine"] == pytest.approx(cosine, abs=2e-6)


def test_the_client_embeds_a_chunk_by_store_keys(server: ServeProcess,
                                                  image_server: ImageServer) -> None:
    urls = serve_good_images(image_server, 3, prefix="serve-client")
    server.post("/v1/score", {"pairs": [{"url": u, "caption": "fetch me"} for u in urls]})
    content = {hashlib.sha256(httpx.get(u).content).hexdigest(): sha256_hex(u) for u in urls}
    captions = {sha256_hex(c): c for c in ("one caption", "another caption")}

    with InferenceClient(server.url(""), model=server.model) as client:
        vectors, failed = remote_image_vectors(client, content)
        texts = remote_text_vectors(client, captions)

    assert failed == {} and set(vectors) == set(content)
    direct = server.post("/v1/embed/images", {"encoding": "base64", "images": [
        {"data": base64.b64encode(httpx.get(u).content).decode()} for u in urls]}).json()
    for sha, embedding in zip(content, direct["embeddings"], strict=True):
        assert np.array_equal(vectors[sha], unpack(embedding))
    assert set(texts) == set(captions) and all(len(v) == len(vectors[sha]) for v in
                                               texts.values())
    with InferenceClient(server.url(""), model="another/model") as client, \
            pytest.raises(UserError, match="serves .* but this run uses another/model"):
        client.text_vectors(["x"])


def test_the_client_imports_no_torch() -> None:
    probe = ("import sys, sim_pipeline.stages.embed.remote; "
             "print(sorted(m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stderr


def test_a_client_that_leaves_frees_its_work(server: ServeProcess,
                                              image_server: ImageServer) -> None:
    image_server.add("/serve-gone/slow.jpg", Route(body=make_image(seed=77), delay=2.0))
    before = metric_samples(server).get(("sim_serve_cancelled_requests_total", ()), 0)
    body = b'{"pairs": [{"url": "%s", "caption": "left"}]}' % image_server.url(
        "/serve-gone/slow.jpg").encode()
    with socket.create_connection((server.host, server.port)) as raw:
        raw.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: image_server.requests["/serve-gone/slow.jpg"] >= 1)

    wait_until(lambda: metric_samples(server).get(
        ("sim_serve_cancelled_requests_total", ()), 0) == before + 1)


def test_metrics_parse_and_cover_requests_batches_caches_and_loading(
        server: ServeProcess) -> None:
    server.post("/v1/embed/texts", {"texts": ["metrics one", "metrics two"]})
    server.post("/v1/embed/texts", {"texts": ["metrics one"]})
    server.post("/v1/embed/images", {"images": [
        {"data": base64.b64encode(make_image(seed=31)).decode()}]})

    samples = metric_samples(server)

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("sim_serve_requests_total", endpoint="/v1/embed/texts", status="200") >= 2
    assert value("sim_serve_request_seconds_count", endpoint="/v1/embed/texts") >= 2
    assert value("sim_serve_batch_size_count", tower="text") >= 1
    assert value("sim_serve_cache_lookups_total", kind="text_vector", result="hit") >= 1
    assert value("sim_serve_cache_lookups_total", kind="text_vector", result="miss") >= 2
    assert value("sim_serve_model_load_seconds", tower="image") > 0
    assert value("sim_serve_queue_depth", tower="image") == 0
    assert value("sim_serve_items_in_flight") == 0


def test_readyz_fails_while_the_database_is_unreachable_and_recovers(
        tmp_path: Path, tiny_model: Path, image_server: ImageServer, pg_url: str) -> None:
    pg_port = sa.make_url(pg_url).port  # 5432, or the session's throwaway cluster
    proxy = PortProxy(pg_port)
    proxy.start()
    through_proxy = pg_url.replace(f"127.0.0.1:{pg_port}", f"127.0.0.1:{proxy.port}")
    service = ServeProcess(tmp_path, tiny_model, image_server.allow_hosts,
                           "--db-retry-seconds", "2",  # a recorded request gives up in 2 s
                           database_url=through_proxy).start()
    try:
        assert httpx.get(service.url("/readyz")).json() == {
            "ready": True, "model": "loaded", "store": "ok", "database": "ok"}

        proxy.stop()
        down = httpx.get(service.url("/readyz"), timeout=30)
        assert down.status_code == 503
        assert down.json()["ready"] is False and down.json()["model"] == "loaded"
        assert down.json()["database"].startswith("unreachable: ")
        assert httpx.get(service.url("/healthz")).status_code == 200
        recorded = service.post("/v1/score", {"record": True,
                                              "pairs": [{"url": "ftp://x/y", "caption": "c"}]})
        assert recorded.status_code == 503 and "not recorded" in recorded.json()["detail"]
        assert "within 2 s" in recorded.json()["detail"], "it retried as --db-retry-seconds says"

        proxy.start()
        wait_until(lambda: httpx.get(service.url("/readyz"), timeout=30).status_code == 200,
                   timeout=30)
    finally:
        service.stop()
        proxy.stop()


def test_the_benchmark_script_runs(tmp_path: Path) -> None:
    env = {**os.environ, "SIM_BENCH_DIR": str(tmp_path), "SIM_BENCH_MODEL_SHAPE": "tiny"}
    done = subprocess.run([sys.executable, "-m", "bench.serve", "--clients", "4", "--rounds",
                           "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batching on / off" in done.stdout
