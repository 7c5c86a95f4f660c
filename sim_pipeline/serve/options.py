"""How the service itself behaves: where it listens, how it batches, what it refuses.

The model, store, database and fetch limits are the pipeline's ``Settings``; these are the knobs
only a long-lived service has. They come from ``serve``'s flags.
"""

from __future__ import annotations

from dataclasses import dataclass

from sim_pipeline.core.errors import UserError

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
MAX_ITEMS_CAP = 1000  # recorded rows are numbered arrival-in-microseconds x 1000 + index


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32  # images or captions per forward pass
    max_wait_ms: float = 5.0  # how long a batch waits for company once it has one item
    max_queue: int = 1024  # items (pairs, images, captions) admitted and not yet answered
    max_items: int = 256  # pairs, images or captions in one request
    max_body_bytes: int = 32 * 1024 * 1024
    drain_seconds: int = 30  # after SIGTERM, how long in-flight requests may take to finish
    api_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("port", "max_batch_size", "max_queue", "max_items", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer.")
        if self.max_wait_ms < 0 or self.drain_seconds < 0:
            raise UserError("--max-wait-ms and --drain-seconds must not be negative.")
        if self.max_items > MAX_ITEMS_CAP:
            raise UserError(f"--max-items must be at most {MAX_ITEMS_CAP}.")
        if self.max_items > self.max_queue:
            raise UserError(f"--max-items ({self.max_items}) must not exceed --max-queue "
                            f"({self.max_queue}): such a request could never be admitted.")
        if self.host not in LOOPBACK_HOSTS and not self.api_keys:
            raise UserError(f"Binding {self.host} exposes the service beyond this machine: set "
                            "SIM_PIPELINE_API_KEYS (comma-separated keys) or bind 127.0.0.1.")
