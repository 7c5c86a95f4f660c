"""What the service refuses before doing any work: oversize bodies (413) and, past a bounded
number of items in flight, new requests (503 with ``Retry-After``).

Refusing early is what keeps latency bounded under overload: a request that would only wait in a
queue longer than its caller's timeout is cheaper to refuse at once, so a load balancer can send it
to another replica.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from starlette.types import ASGIApp, Message, Receive, Scope, Send

RETRY_AFTER_S = 1


class AtCapacity(Exception):
    """More items in flight than ``--max-queue`` allows; answered 503 with ``Retry-After``."""

    def __init__(self, in_flight: int, limit: int) -> None:
        super().__init__(f"The service is at capacity ({in_flight} of {limit} items in flight); "
                         f"retry after {RETRY_AFTER_S} s or on another replica.")


class Admission:
    """Counts the items (pairs, images, captions) admitted and not yet answered."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_flight = limit, 0

    @contextmanager
    def admit(self, items: int) -> Iterator[None]:
        """All of a request's items or none: a half-admitted request would hold room it cannot
        use. Runs on the event loop only, so the count needs no lock."""
        if self.in_flight + items > self.limit:
            raise AtCapacity(self.in_flight, self.limit)
        self.in_flight += items
        try:
            yield
        finally:
            self.in_flight -= items


async def refuse(send: Send, status: int, detail: str,
                 headers: Sequence[tuple[bytes, bytes]] = (), close: bool = False) -> None:
    """Answer ``{"detail": ...}`` from raw ASGI, before the app: ``headers`` go between the
    content type and the length; ``close`` adds ``connection: close`` after them."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *headers,
                            (b"content-length", str(len(body)).encode()),
                            *([(b"connection", b"close")] if close else [])]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """413 for a body over ``limit`` bytes, declared (``Content-Length``) or counted as it arrives.

    The body is read here, up to the limit, and replayed to the app; after it, ``receive`` is the
    server's again, so the app still hears a client disconnect.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = (f"The request body is larger than this service's limit of {self.limit} bytes "
                   "(--max-body-bytes); send fewer items per request.")
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await refuse(send, 413, too_big, close=True)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                await refuse(send, 413, too_big, close=True)
                return
        await self.app(scope, _replay(b"".join(chunks), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
