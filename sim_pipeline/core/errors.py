"""Two kinds of failure: a run the user must fix (``UserError``) and a row that failed (a code).

Per-row problems never raise: every row ends with a similarity or one of the snake_case codes in
``CODES``. That table is the one source for what each code means and whether retrying can help;
README's table of codes is tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass


class UserError(Exception):
    """A problem the user can act on, stated in one sentence; the CLI exits non-zero with it."""


@dataclass(frozen=True)
class ErrorCode:
    """What a row-level code means and how it is retried.

    ``retry_now``: the fetcher tries again within the run, with backoff (the connection broke, or
    the server said "later"). ``retry_next_run``: the cached failure is not trusted, so the next
    run fetches the URL again; every code retried now is also retried by the next run.
    """

    stage: str
    meaning: str
    retry_now: bool = False
    retry_next_run: bool = False


# Input rows (plan)
INVALID_URL = "invalid_url"
UNSUPPORTED_SCHEME = "unsupported_scheme"
MISSING_CAPTION = "missing_caption"
MALFORMED_ROW = "malformed_row"
INVALID_ENCODING = "invalid_encoding"
FIELD_TOO_LONG = "field_too_long"
MAX_ROW_CHARS = 1 << 24  # a longer input row is FIELD_TOO_LONG
# Fetching
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
TOO_LARGE = "too_large"
TOO_MANY_REDIRECTS = "too_many_redirects"
NOT_AN_IMAGE = "not_an_image"
BLOCKED_ADDRESS = "blocked_address"
DNS_ERROR = "dns_error"
CREDENTIALS_IN_URL = "credentials_in_url"
ROBOTS_DISALLOWED = "robots_disallowed"
TLS_ERROR = "tls_error"
# Decoding
DECODE_ERROR = "decode_error"
TOO_MANY_PIXELS = "too_many_pixels"
IMAGE_LOST = "image_lost"

CODES: dict[str, ErrorCode] = {
    INVALID_URL: ErrorCode("plan", "the URL is empty, unparseable or has no host (also when a "
                           "redirect points at such a URL)"),
    UNSUPPORTED_SCHEME: ErrorCode("plan", "anything but `http` / `https` (`ftp:`, `file:`, "
                                  "`data:`, ...), on any redirect hop"),
    CREDENTIALS_IN_URL: ErrorCode("plan", "the URL (or a redirect) carries a user name or "
                                  "password; nothing is sent"),
    MISSING_CAPTION: ErrorCode("plan", "the caption is empty, whitespace only, or missing"),
    MALFORMED_ROW: ErrorCode("plan", "the row has more fields than the header (the extra "
                             "fields are dropped)"),
    INVALID_ENCODING: ErrorCode("plan", "the URL or the caption holds bytes that are not UTF-8 "
                                "(in the scored CSV each such byte is U+FFFD, in any column)"),
    FIELD_TOO_LONG: ErrorCode("plan", f"the row is longer than {MAX_ROW_CHARS:,} characters "
                              "(its fields together; often a quote never closed); its values are "
                              "empty in the scored CSV"),
    BLOCKED_ADDRESS: ErrorCode("fetch", "the host is, or resolves to, a private, loopback, "
                               "link-local, multicast, reserved or unspecified address (on any "
                               "redirect hop) and is not in the allowlist"),
    DNS_ERROR: ErrorCode("fetch", "the host name does not exist"),
    CONNECTION_ERROR: ErrorCode("fetch", "the connection failed or broke (refused, reset, body "
                                "shorter than its `Content-Length`)",
                                retry_now=True, retry_next_run=True),
    TLS_ERROR: ErrorCode("fetch", "the TLS handshake or the certificate check failed"),
    TIMEOUT: ErrorCode("fetch", "the attempt, redirects included, took longer than "
                       "`--fetch-timeout`", retry_next_run=True),
    TOO_MANY_REDIRECTS: ErrorCode("fetch", "more than 5 redirects, or a redirect loop"),
    TOO_LARGE: ErrorCode("fetch", "more than `--max-image-bytes` bytes (declared, or counted "
                         "while streaming)"),
    NOT_AN_IMAGE: ErrorCode("fetch", "the bytes are not a JPEG, PNG, GIF, WebP, BMP, TIFF or "
                            "AVIF, whatever the `Content-Type`"),
    ROBOTS_DISALLOWED: ErrorCode("fetch", "the response said `X-Robots-Tag: noai` or "
                                 "`noimageai`; the body was not downloaded"),
    TOO_MANY_PIXELS: ErrorCode("decode", "width x height above `--max-pixels`, read from the "
                               "header (decompression bombs)"),
    DECODE_ERROR: ErrorCode("decode", "the image is truncated or corrupt"),
    IMAGE_LOST: ErrorCode("decode", "the image's cached bytes were missing or damaged and "
                          "fetching it again did not restore them", retry_next_run=True),
}
HTTP_MEANING = "the server answered with that status instead of 200, e.g. `http_404`"
HTTP_RETRIED = (408, 429)  # and every 5xx


def http_error(status: int) -> str:
    """``http_404`` and friends: the status is the most useful thing to show."""
    return f"http_{status}"


def describe(code: str) -> ErrorCode | None:
    """The table entry of ``code``; ``http_NNN`` codes are described by their status."""
    if code in CODES:
        return CODES[code]
    status = code.removeprefix("http_")
    if code.startswith("http_") and status.isdigit():
        retried = int(status) in HTTP_RETRIED or status.startswith("5")
        return ErrorCode("fetch", HTTP_MEANING, retry_now=retried, retry_next_run=retried)
    return None


def retry_now(code: str | None) -> bool:
    """Worth another try within this run (with backoff)."""
    entry = describe(code) if code else None
    return entry is not None and entry.retry_now


def retry_next_run(code: str | None) -> bool:
    """Failures worth retrying on a later run (the server may be back by then)."""
    entry = describe(code) if code else None
    return entry is not None and entry.retry_next_run


def is_input_error(code: str | None) -> bool:
    """Codes given while planning: such rows never reach the fetcher."""
    entry = describe(code) if code else None
    return entry is not None and entry.stage == "plan"
