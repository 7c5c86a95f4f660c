"""The fetch stage over real HTTP on loopback: safety, limits, retries, caching, stats.

Every test has a canary: a second loopback port that must never receive a request.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import zlib
from pathlib import Path

import pytest

from sim_pipeline.core import errors
from sim_pipeline.core.config import Settings
from sim_pipeline.core.errors import UserError
from sim_pipeline.core.layout import ChunkRef, image_key
from sim_pipeline.core.store import LocalStore, S3Options, S3Store, read_json
from sim_pipeline.stages.decode import DecodeFailed, decode_image
from sim_pipeline.stages.fetch import guard, workers
from sim_pipeline.stages.fetch.chunk import fetch_all, fetch_chunk, fetch_processes
from sim_pipeline.stages.fetch.download import Downloader, Outcome
from sim_pipeline.stages.plan import normalise_row, write_chunks
from tests.conftest import make_image
from tests.origin import FakeDNS, Origin, Reply, fetch_one, fetch_records

JPEG = make_image(seed=1)

pytest_plugins = ["tests.plugin_fetch"]
pytestmark = pytest.mark.usefixtures("loopback_only")


def png_bomb(width: int = 40_000, height: int = 40_000) -> bytes:
    """A valid 1-bit PNG of ``width`` x ``height`` zero pixels: ~200 KB that decode to GBs."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    row = b"\0" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def test_an_image_is_stored_with_its_record_and_an_honest_user_agent(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    url = origin.add("/cat.jpg", body=JPEG, content_type="text/html")  # the type is ignored
    settings = fetch_settings.replace(user_agent="sim-pipeline/9 (+https://example.org/bot)")
    records, stats = fetch_records([url], settings)
    record = records[url]
    assert record["error"] is None
    assert (record["format"], record["width"], record["height"]) == ("jpeg", 96, 64)
    assert record["sha256"] == hashlib.sha256(JPEG).hexdigest() and record["size"] == len(JPEG)
    sent = origin.headers["/cat.jpg"][0]
    assert sent["User-Agent"] == "sim-pipeline/9 (+https://example.org/bot)"
    assert sent["Host"] == f"127.0.0.1:{origin.port}"
    assert (stats.attempted, stats.ok, stats.bytes, stats.retries) == (1, 1, len(JPEG), 0)
    assert stats.latency_seconds(0.5) is not None


def test_loopback_is_blocked_unless_its_port_is_allowlisted(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    url = origin.add("/ok.jpg", body=JPEG)
    assert fetch_one(canary.url("/x.jpg"), fetch_settings)["error"] == errors.BLOCKED_ADDRESS
    assert fetch_one(url, fetch_settings.replace(allow_hosts=""))["error"] == \
        errors.BLOCKED_ADDRESS
    assert origin.total() == 0
    # A cached failure is refetched only when asked, e.g. after changing the allowlist.
    assert fetch_one(url, fetch_settings)["error"] == errors.BLOCKED_ADDRESS
    assert fetch_one(url, fetch_settings.replace(refetch_errors=True))["error"] is None


@pytest.mark.parametrize("target", [
    "http://127.0.0.1:{canary}/stolen", "http://localhost:{canary}/stolen",
    "http://2130706433:{canary}/stolen", "http://0x7f.1:{canary}/stolen",
    "http://[::1]:{canary}/stolen", "http://[::ffff:127.0.0.1]:{canary}/stolen",
    "http://169.254.169.254/latest/meta-data/", "http://[::ffff:a9fe:a9fe]/latest/meta-data/",
    "http://0xa9fea9fe/latest/meta-data/", "http://10.0.0.1/", "http://[fd00:ec2::254]/",
    "http://metadata.test/computeMetadata/v1/",
])
def test_a_redirect_to_a_blocked_address_is_refused_without_connecting(
        origin: Origin, canary: Origin, fetch_settings: Settings, target: str) -> None:
    dns = FakeDNS({"localhost": ["127.0.0.1", "::1"], "metadata.test": ["169.254.169.254"]})
    url = origin.add("/hop", status=302, headers={"Location": target.format(canary=canary.port)})
    assert fetch_one(url, fetch_settings, dns)["error"] == errors.BLOCKED_ADDRESS
    assert origin.requests["/hop"] == 1, "a refused hop is not retried"


@pytest.mark.parametrize(("target", "code"), [
    ("file:///etc/passwd", errors.UNSUPPORTED_SCHEME),
    ("ftp://127.0.0.1/x.jpg", errors.UNSUPPORTED_SCHEME),
    ("data:image/png;base64,iVBORw0KGgo=", errors.UNSUPPORTED_SCHEME),
    ("http://user:pw@127.0.0.1:{port}/ok.jpg", errors.CREDENTIALS_IN_URL),
])
def test_a_redirect_to_a_refused_url_is_refused(
        origin: Origin, canary: Origin, fetch_settings: Settings, target: str, code: str) -> None:
    origin.add("/ok.jpg", body=JPEG)
    url = origin.add("/hop", status=301, headers={"Location": target.format(port=origin.port)})
    assert fetch_one(url, fetch_settings)["error"] == code
    assert origin.requests["/ok.jpg"] == 0


def test_redirects_are_followed_up_to_five_hops_and_loops_are_cut(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    origin.add("/final.jpg", body=JPEG)
    for hop in range(5):
        target = "/final.jpg" if hop == 4 else f"/chain/{hop + 1}"  # relative Locations
        origin.add(f"/chain/{hop}", status=(301, 302, 303, 307, 308)[hop],
                   headers={"Location": target})
    origin.add("/loop", status=302, headers={"Location": "/loop"})
    records, _ = fetch_records([origin.url("/chain/0"), origin.url("/loop")], fetch_settings)
    assert records[origin.url("/chain/0")]["error"] is None
    assert records[origin.url("/loop")]["error"] == errors.TOO_MANY_REDIRECTS
    assert origin.requests["/loop"] == 6


def test_429_with_retry_after_is_honoured_then_succeeds(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    url = origin.add("/busy.jpg", Reply(429, b"slow down", {"Retry-After": "1"}, "text/plain"),
                     Reply(body=JPEG))
    started = time.monotonic()
    records, stats = fetch_records([url], fetch_settings)
    assert records[url]["error"] is None and origin.requests["/busy.jpg"] == 2
    assert time.monotonic() - started >= 1.0
    assert stats.retries == 1


def test_a_retry_after_beyond_the_cap_is_left_to_a_later_run(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    url = origin.add("/later.jpg", status=429, headers={"Retry-After": "3600"})
    started = time.monotonic()
    assert fetch_one(url, fetch_settings)["error"] == "http_429"
    assert origin.requests["/later.jpg"] == 1 and time.monotonic() - started < 1.0


def test_500_then_success_is_retried_with_backoff(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    url = origin.add("/flaky.jpg", Reply(500, b"oops", content_type="text/plain"),
                     Reply(503, b"oops", content_type="text/plain"), Reply(body=JPEG))
    records, stats = fetch_records([url], fetch_settings)
    assert records[url]["error"] is None and origin.requests["/flaky.jpg"] == 3
    assert stats.retries == 2


def test_retries_stop_at_the_limit_and_other_4xx_are_never_retried(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    down = origin.add("/down.jpg", status=502)
    gone = origin.add("/gone.jpg", status=404)
    timeout = origin.add("/408.jpg", Reply(408), Reply(body=JPEG))
    records, _ = fetch_records([down, gone, timeout], fetch_settings)
    assert records[down]["error"] == "http_502" and origin.requests["/down.jpg"] == 3
    assert records[gone]["error"] == "http_404" and origin.requests["/gone.jpg"] == 1
    assert records[timeout]["error"] is None and origin.requests["/408.jpg"] == 2


def test_a_slow_body_hits_the_per_image_deadline(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    """Each piece arrives well within any read timeout; only a total deadline stops it."""
    url = origin.add("/drip.jpg", body=JPEG * 4, drip=0.3)
    settings = fetch_settings.replace(fetch_timeout=1.0)
    started = time.monotonic()
    assert fetch_one(url, settings)["error"] == errors.TIMEOUT
    assert time.monotonic() - started < 2.5
    assert origin.requests["/drip.jpg"] == 1, "timeouts are not retried within a run"


def test_slow_headers_time_out(origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    url = origin.add("/asleep.jpg", body=JPEG, delay=3)
    assert fetch_one(url, fetch_settings.replace(fetch_timeout=0.5))["error"] == errors.TIMEOUT


def test_an_endless_body_without_content_length_stops_at_the_cap(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    url = origin.add("/endless.jpg", body=JPEG, length=None, stream=200_000_000)
    started = time.monotonic()
    assert fetch_one(url, fetch_settings)["error"] == errors.TOO_LARGE
    assert time.monotonic() - started < 2.0
    time.sleep(0.2)
    assert origin.sent["/endless.jpg"] < 30_000_000, "we hung up soon after the cap"


def test_a_declared_oversize_is_refused_before_the_body(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    url = origin.add("/huge.jpg", body=JPEG, length=50_000_000)
    assert fetch_one(url, fetch_settings)["error"] == errors.TOO_LARGE


def test_a_lying_content_length_never_yields_more_than_declared(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    url = origin.add("/short-claim.jpg", body=JPEG, length=2048, stream=20_000_000)
    store = LocalStore(fetch_settings.store)
    record = fetch_one(url, fetch_settings)
    assert record["size"] == 2048, "the extra bytes were never read"
    if record["error"] is None:
        with pytest.raises(DecodeFailed) as failure:
            decode_image(store.read_bytes(image_key(_hash(url))))
        assert failure.value.code == errors.DECODE_ERROR


def test_a_body_shorter_than_its_content_length_is_a_connection_error(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    url = origin.add("/cut.jpg", body=JPEG[:1000], length=len(JPEG))
    assert fetch_one(url, fetch_settings)["error"] == errors.CONNECTION_ERROR


def test_a_gzip_bomb_is_stopped_at_the_cap(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    bomb = gzip.compress(b"\0" * 100_000_000)
    url = origin.add("/bomb.jpg", body=bomb, headers={"Content-Encoding": "gzip"})
    assert len(bomb) < 200_000
    assert fetch_one(url, fetch_settings)["error"] == errors.TOO_LARGE


def test_a_gzipped_image_is_still_read(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    url = origin.add("/zipped.jpg", body=gzip.compress(JPEG), headers={"Content-Encoding": "gzip"})
    record = fetch_one(url, fetch_settings)
    assert record["error"] is None and record["sha256"] == hashlib.sha256(JPEG).hexdigest()


def test_decompression_bombs_are_refused_from_the_header(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    bomb = origin.add("/bomb.png", body=png_bomb(), content_type="image/png")
    big = origin.add("/big.png", body=make_image(seed=2, fmt="PNG", size=(2000, 1000)))
    records, _ = fetch_records([bomb, big], fetch_settings.replace(max_pixels=1_000_000))
    assert records[bomb]["error"] == errors.TOO_MANY_PIXELS
    assert records[big]["error"] == errors.TOO_MANY_PIXELS
    assert not LocalStore(fetch_settings.store).exists(image_key(_hash(bomb)))


@pytest.mark.parametrize(("body", "content_type"), [
    (b"<!doctype html><html><body>not here</body></html>", "image/jpeg"),
    (b"", "image/jpeg"),
    (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n", "image/jpeg"),
])
def test_bodies_that_are_not_images_are_not_an_image(
        origin: Origin, canary: Origin, fetch_settings: Settings, body: bytes,
        content_type: str) -> None:
    url = origin.add("/page.jpg", body=body, content_type=content_type)
    assert fetch_one(url, fetch_settings)["error"] == errors.NOT_AN_IMAGE


def test_x_robots_tag_noai_is_respected_without_downloading_the_body(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    noai = origin.add("/noai.jpg", body=JPEG * 20, drip=0.5, headers={"X-Robots-Tag": "noai"})
    scoped = origin.add("/other.jpg", body=JPEG, headers={"X-Robots-Tag": "otherbot: noimageai"})
    started = time.monotonic()
    records, _ = fetch_records([noai, scoped], fetch_settings)
    assert records[noai]["error"] == errors.ROBOTS_DISALLOWED
    assert time.monotonic() - started < 1.5, "the dripping body was not waited for"
    assert not LocalStore(fetch_settings.store).exists(image_key(_hash(noai)))
    assert records[scoped]["error"] is None


def test_urls_with_credentials_are_never_sent(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    origin.add("/private.jpg", body=JPEG)
    url = f"http://admin:hunter2@127.0.0.1:{origin.port}/private.jpg"
    assert fetch_one(url, fetch_settings)["error"] == errors.CREDENTIALS_IN_URL
    assert origin.total() == 0


@pytest.mark.parametrize(("url", "code"), [
    ("file:///etc/hosts", errors.UNSUPPORTED_SCHEME), ("ftp://127.0.0.1/x.jpg",
                                                       errors.UNSUPPORTED_SCHEME),
    ("data:image/png;base64,iVBORw0KGgo=", errors.UNSUPPORTED_SCHEME),
    ("http://nowhere.test/x.jpg", errors.DNS_ERROR), ("http://999.0.0.1/x.jpg",
                                                      errors.INVALID_URL),
    ("http://127.0.0.1:99999/x.jpg", errors.INVALID_URL),
    ("http://127.0.0.1:-1/x.jpg", errors.INVALID_URL),
    ("http://127.0.0.1:0/x.jpg", errors.INVALID_URL),
])
def test_other_schemes_and_bad_hosts_get_their_codes(
        canary: Origin, fetch_settings: Settings, url: str, code: str) -> None:
    assert fetch_one(url, fetch_settings)["error"] == code


def test_ipv6_literals_are_guarded_and_can_be_allowlisted(
        canary: Origin, fetch_settings: Settings) -> None:
    assert fetch_one(f"http://[::1]:{canary.port}/x.jpg", fetch_settings)["error"] == \
        errors.BLOCKED_ADDRESS
    try:
        server = Origin("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        url = server.add("/v6.jpg", body=JPEG)
        settings = fetch_settings.replace(allow_hosts=f"[::1]:{server.port}")
        assert fetch_one(url, settings)["error"] is None
        assert server.headers["/v6.jpg"][0]["Host"] == f"[::1]:{server.port}"
    finally:
        server.close()


def test_idn_hosts_resolve_as_punycode_and_match_the_allowlist(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    dns = FakeDNS({"xn--bcher-kva.test": ["127.0.0.1"]})
    origin.add("/bild.jpg", body=JPEG)
    url = f"http://bücher.test:{origin.port}/bild.jpg"
    assert fetch_one(url, fetch_settings, dns)["error"] == errors.BLOCKED_ADDRESS
    allowed = fetch_settings.replace(allow_hosts=f"Bücher.test:{origin.port}",
                                     refetch_errors=True)
    assert fetch_one(url, allowed, dns)["error"] is None
    assert origin.headers["/bild.jpg"][0]["Host"] == f"xn--bcher-kva.test:{origin.port}"


def test_the_connection_goes_to_the_address_that_was_resolved(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    """No second lookup happens after the check: the system resolver does not know the name."""
    dns = FakeDNS({"pinned.test": ["127.0.0.1"]})
    origin.add("/pinned.jpg", body=JPEG)
    settings = fetch_settings.replace(allow_hosts=f"pinned.test:{origin.port}")
    assert fetch_one(f"http://pinned.test:{origin.port}/pinned.jpg", settings, dns)["error"] \
        is None
    assert dns.calls["pinned.test"] == 1


def test_a_name_with_any_private_answer_is_blocked(
        canary: Origin, fetch_settings: Settings) -> None:
    dns = FakeDNS({"rebind.test": ["93.184.215.14", "127.0.0.1"]})
    assert fetch_one(f"http://rebind.test:{canary.port}/", fetch_settings, dns)["error"] == \
        errors.BLOCKED_ADDRESS


def test_per_host_and_global_limits_hold(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    urls = [origin.add(f"/slow/{i}.jpg", body=JPEG, delay=0.2) for i in range(8)]
    settings = fetch_settings.replace(fetch_per_host=2, fetch_concurrency=8)
    records, _ = fetch_records(urls, settings)
    assert all(r["error"] is None for r in records.values())
    assert origin.max_in_flight == 2
    origin.max_in_flight = 0
    urls = [origin.add(f"/slow2/{i}.jpg", body=JPEG, delay=0.2) for i in range(8)]
    fetch_records(urls, fetch_settings.replace(fetch_per_host=8, fetch_concurrency=3))
    assert origin.max_in_flight == 3


def chunk_of(store: LocalStore, run_id: str, urls: list[str]) -> ChunkRef:
    rows = [normalise_row(i, url, f"caption {i}", [url, f"caption {i}"])
            for i, url in enumerate(urls)]
    (chunk,) = write_chunks(store, run_id, "digest", rows, len(rows))
    return chunk


def test_repeated_urls_are_fetched_once_and_cached_urls_never_again(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    store = LocalStore(fetch_settings.store)
    url = origin.add("/same.jpg", body=JPEG)
    stats = fetch_chunk(chunk_of(store, "run-1", [url] * 5), store, fetch_settings)
    assert (stats.attempted, stats.ok, stats.cached) == (1, 1, 0)
    assert fetch_chunk(chunk_of(store, "run-1", [url] * 5), store, fetch_settings).cached == 1
    assert fetch_chunk(chunk_of(store, "run-2", [url]), store, fetch_settings).cached == 1
    assert origin.requests["/same.jpg"] == 1


def test_failures_are_cached_transient_ones_retried_by_a_later_run(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    store = LocalStore(fetch_settings.store)
    settings = fetch_settings.replace(fetch_retries=0)
    gone = origin.add("/gone.jpg", status=404)
    flaky = origin.add("/flaky.jpg", Reply(503), Reply(body=JPEG))
    stats = fetch_chunk(chunk_of(store, "run-1", [gone, flaky]), store, settings)
    assert stats.errors == {"http_404": 1, "http_503": 1}
    stats = fetch_chunk(chunk_of(store, "run-2", [gone, flaky]), store, settings)
    assert (stats.attempted, stats.ok, stats.cached) == (1, 1, 1)
    assert origin.requests == {"/gone.jpg": 1, "/flaky.jpg": 2}
    refetch = settings.replace(refetch_errors=True)
    stats = fetch_chunk(chunk_of(store, "run-3", [gone, flaky]), store, refetch)
    assert (stats.attempted, stats.cached) == (1, 1) and origin.requests["/gone.jpg"] == 2


def test_chunk_stats_are_stored_with_the_run(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    store = LocalStore(fetch_settings.store)
    urls = [origin.add("/a.jpg", body=JPEG), origin.add("/b.jpg", Reply(500), Reply(body=JPEG)),
            origin.add("/c.jpg", status=404)]
    chunk = chunk_of(store, "run-stats", urls)
    fetch_chunk(chunk, store, fetch_settings)
    saved = read_json(store, chunk.fetch_key)
    assert (saved["attempted"], saved["ok"], saved["retries"]) == (3, 2, 1)
    assert saved["errors"] == {"http_404": 1} and saved["bytes"] == 2 * len(JPEG)
    assert 0 < saved["latency_p50_s"] <= saved["latency_p95_s"]


def _hash(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


def test_keep_alive_connections_are_reused_and_one_the_server_closed_is_replaced(
        canary: Origin, fetch_settings: Settings) -> None:
    server = Origin(keep_alive=True)
    try:
        urls = [server.add(f"/ka/{i}.jpg", body=JPEG) for i in range(3)]
        bye = server.add("/ka/bye.jpg", body=JPEG, hang_up=True)
        settings = fetch_settings.replace(allow_hosts=f"127.0.0.1:{server.port}",
                                          fetch_concurrency=1, fetch_per_host=1)

        async def fetch_in_turn() -> list[Outcome]:
            async with Downloader(settings, FakeDNS()) as downloader:
                return [await downloader.fetch(url) for url in [urls[0], urls[1], bye, urls[2]]]

        outcomes = asyncio.run(fetch_in_turn())
        assert [(o.error, o.retries) for o in outcomes] == [(None, 0)] * 4
        assert server.total() == 4 and server.connections == 2
    finally:
        server.close()


def test_limits_are_split_between_fetch_processes() -> None:
    assert fetch_processes(Settings(fetch_processes=4, fetch_per_host=2), 100_000) == 2
    assert fetch_processes(Settings(fetch_processes=4, fetch_concurrency=3), 100_000) == 3
    assert fetch_processes(Settings(fetch_processes=8), 2_500) == 2, "~1,000 URLs a process"
    assert fetch_processes(Settings(fetch_processes=1), 100_000) == 1


def test_a_large_chunk_is_shared_by_processes_within_the_limits(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    urls = [origin.add(f"/many/{i}.jpg", body=JPEG, delay=0.05) for i in range(12)]
    settings = fetch_settings.replace(fetch_processes=2, fetch_concurrency=8, fetch_per_host=4)
    store = LocalStore(settings.store)
    stats = fetch_all({_hash(u): u for u in urls}, store, settings, min_per_process=5)
    assert (stats.attempted, stats.ok, stats.cached) == (12, 12, 0)
    assert all(origin.requests[f"/many/{i}.jpg"] == 1 for i in range(12))
    assert origin.max_in_flight <= 4
    assert store.read_bytes(image_key(_hash(urls[0]))) == JPEG


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for images.test (no other name), made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=images.test",
                    "-addext", "subjectAltName=DNS:images.test"], check=True,
                   capture_output=True)
    return cert, key


@pytest.mark.parametrize(("name", "verified"), [("images.test", True), ("other.test", False)])
def test_https_connects_to_the_checked_address_but_verifies_the_host_name(
        certificate: tuple[Path, Path], canary: Origin, fetch_settings: Settings, name: str,
        verified: bool) -> None:
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(*certificate)
    server = Origin(tls=server_tls)
    try:
        server.add("/secure.jpg", body=JPEG)
        trust = ssl.create_default_context(cafile=str(certificate[0]))
        settings = fetch_settings.replace(allow_hosts=f"{name}:{server.port}")
        dns = FakeDNS({name: ["127.0.0.1"]})

        async def fetch() -> Outcome:
            async with Downloader(settings, dns, trust) as downloader:
                return await downloader.fetch(f"https://{name}:{server.port}/secure.jpg")

        outcome = asyncio.run(fetch())
        assert server.server_names[:1] == [name], "SNI carries the name, not the address"
        if verified:
            assert outcome.error is None and outcome.data == JPEG
            assert server.headers["/secure.jpg"][0]["Host"] == f"{name}:{server.port}"
        else:
            assert outcome.error == errors.TLS_ERROR, "a certificate for another name"
            assert server.total() == 0 and len(server.server_names) == 1, "never retried"
    finally:
        server.close()


def test_https_to_a_server_that_never_answers_the_handshake_is_a_tls_error_at_once(
        canary: Origin, fetch_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain-HTTP server that waits for a request line never answers a ClientHello: that is
    ``tls_error`` within the handshake bound, not ``timeout`` after the fetch deadline."""
    monkeypatch.setattr(guard, "TLS_HANDSHAKE_SECONDS", 0.5)
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
    try:
        settings = fetch_settings.replace(allow_hosts=f"127.0.0.1:{port}", fetch_timeout=30.0)
        started = time.monotonic()
        record = fetch_one(f"https://127.0.0.1:{port}/x.jpg", settings)
        assert record["error"] == errors.TLS_ERROR
        assert time.monotonic() - started < 5, "not the 30 s fetch deadline"
        assert len(accepted) == 1, "one handshake, never retried"
    finally:
        for conn in accepted:
            conn.close()
        silent.close()


def test_a_store_error_in_a_fetch_process_is_raised_and_the_next_chunk_still_runs(
        origin: Origin, canary: Origin, fetch_settings: Settings, tmp_path: Path) -> None:
    urls = {_hash(u): u for u in [origin.add(f"/p/{i}.jpg", body=JPEG) for i in range(10)]}
    settings = fetch_settings.replace(fetch_processes=2)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("a file where the store's folder should be")
    with pytest.raises(NotADirectoryError):
        fetch_all(urls, LocalStore(not_a_folder), settings, min_per_process=5)
    stats = fetch_all(urls, LocalStore(settings.store), settings, min_per_process=5)
    assert stats.ok == 10


def test_a_fetch_process_that_dies_is_reported_and_the_next_chunk_still_runs(
        origin: Origin, canary: Origin, fetch_settings: Settings) -> None:
    urls = {_hash(u): u for u in [origin.add(f"/d/{i}.jpg", body=JPEG) for i in range(10)]}
    settings = fetch_settings.replace(fetch_processes=2)

    class DyingStore(LocalStore):
        """Unpickled in the worker as a call that kills it."""

        def __reduce__(self) -> tuple:
            return os._exit, (3,)

    with pytest.raises(RuntimeError, match="fetch worker process died"):
        fetch_all(urls, DyingStore(settings.store), settings, min_per_process=5)
    assert fetch_all(urls, LocalStore(settings.store), settings, min_per_process=5).ok == 10


def test_a_user_error_in_a_fetch_process_reaches_the_caller(
        origin: Origin, canary: Origin, fetch_settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed}", "AWS_MAX_ATTEMPTS": "1",
                        "AWS_EC2_METADATA_DISABLED": "true", "AWS_ACCESS_KEY_ID": "x",
                        "AWS_SECRET_ACCESS_KEY": "y"}.items():
        monkeypatch.setenv(name, value)  # AWS_MAX_ATTEMPTS: workers started from now on
    workers.stop_all()
    unreachable = S3Options(endpoint_url=f"http://127.0.0.1:{closed}", aws_access_key_id="x",
                            aws_secret_access_key="y")

    class UnreachableS3(LocalStore):
        """Pickled as an S3 store (with its options), which the worker then fails to open."""

        def __reduce__(self) -> tuple:
            return S3Store, ("some-bucket", "", unreachable)

    urls = {_hash(u): u for u in [origin.add(f"/u/{i}.jpg", body=JPEG) for i in range(10)]}
    with pytest.raises(UserError, match="Cannot reach the S3 endpoint"):
        fetch_all(urls, UnreachableS3(fetch_settings.store),
                  fetch_settings.replace(fetch_processes=2), min_per_process=5)
    assert origin.total() == 0
