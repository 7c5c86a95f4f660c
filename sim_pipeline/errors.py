"""Two kinds of failure: a run the user must fix (``UserError``) and a row that failed (a code).

Per-row problems never raise: every row ends with a similarity or one of these snake_case codes.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can act on, stated in one sentence; the CLI exits non-zero with it."""


# Input rows
INVALID_URL = "invalid_url"
UNSUPPORTED_SCHEME = "unsupported_scheme"
MISSING_CAPTION = "missing_caption"
MALFORMED_ROW = "malformed_row"
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


def http_error(status: int) -> str:
    """``http_404`` and friends: the status is the most useful thing to show."""
    return f"http_{status}"


TRANSIENT_PREFIXES = ("http_5", "http_429", "http_408", TIMEOUT, CONNECTION_ERROR)


def is_transient(code: str | None) -> bool:
    """Failures worth retrying on a later run (the server may be back by then)."""
    return bool(code) and code.startswith(TRANSIENT_PREFIXES)
