"""API keys: who may call the service when it listens beyond 127.0.0.1.

Keys come from ``SIM_PIPELINE_API_KEYS`` (comma-separated; ``core.config.api_keys``), not from
``Settings``: settings travel to pods and Airflow tasks and appear in reprs; keys must not. A caller
sends ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. Every configured key is compared in
constant time (``hmac.compare_digest``), so timing tells nothing about how much of a key matched.
Probes and the API description stay open: load balancers and browsers cannot always send a key.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from starlette.types import ASGIApp, Receive, Scope, Send

from sim_pipeline.serve.limits import refuse

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/openapi.json"})
DOCS_ASSETS = "/docs/assets"  # Swagger UI's JavaScript and CSS, open like /docs itself


def key_matches(offered: str, keys: tuple[str, ...]) -> bool:
    """True if ``offered`` equals one of ``keys``; every key is compared, in constant time."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(offered.encode(), key.encode())
    return found


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(f"{DOCS_ASSETS}/")


def offered_key(headers: Mapping[str, str]) -> str:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key", "")


class ApiKeyMiddleware:
    """Answers 401 to any request without a valid key, except on ``OPEN_PATHS``."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if key_matches(offered_key(headers), self.keys):
            await self.app(scope, receive, send)
            return
        await refuse(send, 401, "A valid API key is required: send 'Authorization: Bearer "
                                "<key>' or 'X-API-Key: <key>'.",
                     [(b"www-authenticate", b"Bearer")])
