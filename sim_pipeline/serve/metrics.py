"""The service's Prometheus metrics, in a registry of its own (so two apps in one process never
share counters), and the ASGI middleware that counts every request by endpoint and status.

Names are ``sim_serve_*``; docs/service.md lists them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("sim_serve_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("sim_serve_request_seconds", "HTTP request latency",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.item_errors = Counter("sim_serve_item_errors", "pairs or images that ended with an "
                                   "error code, by code", ["code"], registry=r)
        self.batch_size = Histogram("sim_serve_batch_size", "items per model forward pass",
                                    ["tower"], buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram("sim_serve_inference_seconds", "time of one forward pass",
                                   ["tower"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("sim_serve_queue_depth", "items waiting for a forward pass",
                                 ["tower"], registry=r)
        self.in_flight = Gauge("sim_serve_items_in_flight", "items admitted and not yet "
                               "answered (503 past --max-queue)", registry=r)
        self.cache = Counter("sim_serve_cache_lookups", "cache lookups by kind and result",
                             ["kind", "result"], registry=r)
        self.model_load = Gauge("sim_serve_model_load_seconds", "time to load each tower",
                                ["tower"], registry=r)
        self.cancelled = Counter("sim_serve_cancelled_requests", "requests whose client "
                                 "disconnected before the answer; their work was dropped",
                                 registry=r)

    def cache_lookup(self, kind: str, hit: bool) -> None:
        self.cache.labels(kind, "hit" if hit else "miss").inc()

    def count_errors(self, codes: Iterable[str | None]) -> None:
        for code in codes:
            if code:
                self.item_errors.labels(code).inc()


class RequestMetricsMiddleware:
    """Counts and times every HTTP request; unknown paths share one label, so a scanner
    probing random URLs cannot blow up the number of time series."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, paths: frozenset[str]) -> None:
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in self.paths else "other"
        status = 499  # nothing sent: the client left first (nginx's "client closed request")
        started = time.perf_counter()

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
