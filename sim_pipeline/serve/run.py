"""``sim-pipeline serve``: the app under uvicorn, with the checks that must pass before binding.

A model that cannot be loaded stops the server and the command exits 2 with the loader's one
sentence, as every other command does.
"""

from __future__ import annotations

import contextlib
import logging

import uvicorn

from sim_pipeline.core.config import Settings
from sim_pipeline.core.errors import UserError
from sim_pipeline.core.faults import Terminated
from sim_pipeline.serve.app import create_app
from sim_pipeline.serve.options import ServeOptions


def serve(settings: Settings, options: ServeOptions) -> None:
    """Serve until SIGTERM or SIGINT; requests in flight then finish (``--drain-seconds``) and
    a drained SIGTERM ends with status 0."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    fatal: list[str] = []
    server: uvicorn.Server | None = None

    def stop(reason: str) -> None:
        fatal.append(reason)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, options, on_fatal=stop)
    config = uvicorn.Config(app, host=options.host, port=options.port, access_log=False,
                            timeout_graceful_shutdown=options.drain_seconds, log_level="info")
    server = uvicorn.Server(config)
    with contextlib.suppress(Terminated):  # uvicorn re-raises SIGTERM once drained: planned
        server.run()
    if fatal:
        raise UserError(fatal[0])
