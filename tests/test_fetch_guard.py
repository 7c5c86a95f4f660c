"""The SSRF guard's decisions, checked as pure functions: nothing here opens a connection."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from sim_pipeline.core import errors
from sim_pipeline.core.config import Settings, load_settings
from sim_pipeline.core.errors import UserError
from sim_pipeline.core.urls import (
    AllowEntry,
    UnknownHost,
    parse_allowlist,
    parse_ip_literal,
    url_problem,
)
from sim_pipeline.stages.fetch.download import backoff, parse_retry_after, robots_opt_out
from sim_pipeline.stages.fetch.guard import AddressGuard, BlockedAddress, is_blocked
from tests.origin import FakeDNS

BLOCKED = [
    "127.0.0.1", "127.255.255.254", "0.0.0.0", "10.0.0.1", "172.16.0.1", "172.31.255.255",
    "192.168.1.1", "169.254.169.254", "169.254.0.1", "100.64.0.1", "192.0.0.8", "192.0.2.1",
    "198.18.0.1", "198.51.100.7", "203.0.113.9", "224.0.0.1", "239.255.255.250", "240.0.0.1",
    "255.255.255.255",
    "::", "::1", "fe80::1", "fc00::1", "fd00:ec2::254", "fec0::1", "ff02::1", "ff0e::1",
    "2001:db8::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1",
    "::127.0.0.1", "64:ff9b::a9fe:a9fe", "64:ff9b::7f00:1", "64:ff9b:1::1",
    "2002:7f00:1::1", "2002:a9fe:a9fe::1", "2002:c0a8:101::1", "100::1", "2001::1",
]
PUBLIC = ["93.184.215.14", "8.8.8.8", "1.1.1.1", "151.101.1.69", "2606:4700::1111",
          "2a00:1450:4001:81c::200e", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]

pytest_plugins = ["tests.plugin_fetch"]
pytestmark = pytest.mark.usefixtures("loopback_only")


@pytest.mark.parametrize("address", BLOCKED)
def test_private_loopback_link_local_multicast_reserved_and_unspecified_are_blocked(
        address: str) -> None:
    assert is_blocked(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_unicast_addresses_are_allowed(address: str) -> None:
    assert not is_blocked(ipaddress.ip_address(address))


@pytest.mark.parametrize(("spelling", "address"), [
    ("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"), ("0x7f.1", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"), ("127.1", "127.0.0.1"), ("127.0.1", "127.0.0.1"),
    ("017700000001", "127.0.0.1"), ("127.0.0.1.", "127.0.0.1"), ("0xa9fea9fe", "169.254.169.254"),
    ("0251.0376.0251.0376", "169.254.169.254"), ("169.254.43518", "169.254.169.254"),
    ("[::1]", "::1"), ("::ffff:7f00:1", "::ffff:127.0.0.1"), ("fe80::1%25eth0", "fe80::1"),
    ("0", "0.0.0.0"),
])
def test_odd_ip_spellings_are_read_as_the_address_they_name(spelling: str, address: str) -> None:
    ip = parse_ip_literal(spelling)
    assert ip == ipaddress.ip_address(address)
    assert is_blocked(ip)


@pytest.mark.parametrize("host", ["example.com", "bücher.test", "xn--bcher-kva.test", "a1", "1a"])
def test_names_are_not_addresses(host: str) -> None:
    assert parse_ip_literal(host) is None


@pytest.mark.parametrize("host", ["256.0.0.1", "1.2.3.4.5", "09.1.1.1", "example.123",
                                  "1.2.3.0x100", "4294967296", "[::zz]"])
def test_a_numeric_host_that_is_no_address_never_reaches_dns(host: str) -> None:
    with pytest.raises(UnknownHost):
        parse_ip_literal(host)


def test_every_answer_must_be_public_and_allowlisted_hosts_are_exempt_by_port() -> None:
    dns = FakeDNS({"mixed.test": ["93.184.215.14", "10.0.0.7"], "public.test": ["8.8.8.8"],
                   "metadata.test": ["169.254.169.254"], "localhost": ["127.0.0.1", "::1"]})
    guard = AddressGuard(parse_allowlist("127.0.0.1:8080, localhost:9000, [::1]"), dns)

    def check(host: str, port: int) -> list[str]:
        return [str(ip) for ip in asyncio.run(guard.addresses(host, port))]

    assert check("public.test", 80) == ["8.8.8.8"]
    for host, port in [("mixed.test", 80), ("metadata.test", 80), ("127.0.0.1", 8081),
                       ("localhost", 8080), ("2130706433", 8081), ("169.254.169.254", 80),
                       ("::ffff:127.0.0.1", 80)]:
        with pytest.raises(BlockedAddress):
            check(host, port)
    assert check("127.0.0.1", 8080) == ["127.0.0.1"]
    assert check("0x7f.1", 8080) == ["127.0.0.1"], "the same address, spelled differently"
    assert check("localhost", 9000) == ["127.0.0.1", "::1"]
    assert check("::1", 1234) == ["::1"], "no port: every port of that host"
    with pytest.raises(UnknownHost):
        check("unknown.test", 80)
    guard.close()


def test_the_allowlist_reads_hosts_ports_ipv6_and_idn() -> None:
    assert parse_allowlist(" 127.0.0.1:8080 ,images.example.com,[::1]:9000,Bücher.Test:81,") == (
        AllowEntry("127.0.0.1", 8080), AllowEntry("images.example.com", None),
        AllowEntry("::1", 9000), AllowEntry("xn--bcher-kva.test", 81))
    assert parse_allowlist("") == ()
    for bad in ["http://x.test/", "x.test:notaport", "user@x.test", "x.test:99999"]:
        with pytest.raises(ValueError, match="host\\[:port\\]"):
            parse_allowlist(bad)


def test_settings_take_the_allowlist_from_the_environment_and_reject_a_bad_one() -> None:
    settings = load_settings(environ={"SIM_PIPELINE_ALLOW_HOSTS": "127.0.0.1:8080",
                                      "SIM_PIPELINE_REFETCH_ERRORS": "true"})
    assert settings.allow_hosts == "127.0.0.1:8080" and settings.refetch_errors is True
    assert load_settings(environ={"SIM_PIPELINE_REFETCH_ERRORS": "0"}).refetch_errors is False
    with pytest.raises(UserError, match="ALLOW_HOSTS"):
        Settings(allow_hosts="http://nope/")
    with pytest.raises(UserError, match="REFETCH_ERRORS"):
        load_settings(environ={"SIM_PIPELINE_REFETCH_ERRORS": "maybe"})


@pytest.mark.parametrize(("url", "code"), [
    ("http://example.com/a.jpg", None),
    ("https://bücher.example/bild.jpg", None),
    ("http://[2606:4700::1111]/x.jpg", None),
    ("file:///etc/passwd", errors.UNSUPPORTED_SCHEME),
    ("ftp://example.com/a.jpg", errors.UNSUPPORTED_SCHEME),
    ("data:image/png;base64,iVBORw0KGgo=", errors.UNSUPPORTED_SCHEME),
    ("gopher://127.0.0.1:6379/_FLUSHALL", errors.UNSUPPORTED_SCHEME),
    ("http://user:secret@example.com/a.jpg", errors.CREDENTIALS_IN_URL),
    ("http://user@example.com/a.jpg", errors.CREDENTIALS_IN_URL),
    ("http://example.com:80@127.0.0.1/a.jpg", errors.CREDENTIALS_IN_URL),
    ("http://256.1.1.1/a.jpg", errors.INVALID_URL),
    ("http:///a.jpg", errors.INVALID_URL),
])
def test_urls_refused_before_any_network_use(url: str, code: str | None) -> None:
    assert url_problem(url) == code


@pytest.mark.parametrize(("values", "opted_out"), [
    (["noai"], True), (["noimageai"], True), (["noindex, NoAI"], True),
    (["noindex", "noimageai"], True), (["sim-pipeline: noai"], True),
    (["otherbot: noai"], False), (["noindex, nofollow"], False), (["none"], False),
    (["max-snippet: 20, noimageai"], True), (["unavailable_after: 25 Jun 2010 15:00:00 PST"],
                                             False), ([], False),
])
def test_x_robots_tag_opt_out(values: list[str], opted_out: bool) -> None:
    assert robots_opt_out(values, "sim-pipeline") is opted_out


def test_retry_after_reads_seconds_and_http_dates() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    assert [backoff(n, lambda lo, hi: lo) for n in range(6)] == [0.25, 0.5, 1.0, 2.0, 4.0, 4.0]
    assert [backoff(n, lambda lo, hi: hi) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
