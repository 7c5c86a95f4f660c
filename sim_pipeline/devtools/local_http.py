"""A threaded HTTP server for serving images on loopback (the demo, the benchmarks, the tests)."""

from __future__ import annotations

from http.server import ThreadingHTTPServer


class QueueingHTTPServer(ThreadingHTTPServer):
    """A listen backlog of 128, not socketserver's 5, which drops connection attempts when a
    dozen downloads start at once; each dropped one waits out TCP's 1 s retransmit, and the
    server, not the downloader, would set the pace."""

    request_queue_size = 128
    daemon_threads = True
