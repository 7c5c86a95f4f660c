"""The FastAPI application: routes, error answers, middleware, lifespan.

``create_app`` builds one app around one ``Service``; ``sim-pipeline serve`` runs it under
uvicorn, whose SIGTERM handling stops accepting connections, lets requests in flight finish
(up to ``--drain-seconds``), and only then runs the lifespan's shutdown.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from swagger_ui_bundle import swagger_ui_path

from sim_pipeline.core.config import Settings
from sim_pipeline.core.errors import UserError
from sim_pipeline.serve.limits import RETRY_AFTER_S, AtCapacity, BodyLimitMiddleware
from sim_pipeline.serve.metrics import RequestMetricsMiddleware, ServeMetrics
from sim_pipeline.serve.models import (
    Embedding,
    EmbedImagesRequest,
    EmbedResponse,
    EmbedTextsRequest,
    Encoding,
    Health,
    PairResult,
    Problem,
    Readiness,
    ScoreRequest,
    ScoreResponse,
)
from sim_pipeline.serve.options import ServeOptions
from sim_pipeline.serve.security import DOCS_ASSETS, ApiKeyMiddleware
from sim_pipeline.serve.service import BadInput, NotReady, Service, Unavailable, VectorOrCode

T = TypeVar("T")
NOT_READY_RETRY_S = 5
CLIENT_GONE = 499  # nginx's "client closed request": recorded, never seen by the client
REFUSALS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "no valid API key"},
    413: {"model": Problem, "description": "the body is over --max-body-bytes"},
    422: {"model": Problem, "description": "the request is malformed or has too many items"},
    503: {"model": Problem, "description": "at capacity or not ready; see Retry-After"},
}


class TooManyItems(Exception):
    pass


def one_sentence(errors: Sequence[Any]) -> str:
    """pydantic's list of problems as one sentence a caller can act on."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"The body is not valid JSON ({first.get('ctx', {}).get('error', 'unreadable')})."
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}."


def _problem(status: int, detail: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T],
                             metrics: ServeMetrics) -> T | Response:
    """Run ``work`` unless the client leaves first; then cancel it, so its queued items are
    dropped before inference and its downloads stop."""
    task = asyncio.ensure_future(work)

    async def client_left() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(client_left())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    metrics.cancelled.inc()
    await asyncio.gather(task, return_exceptions=True)
    return Response(status_code=CLIENT_GONE)


def _embedding(value: VectorOrCode, encoding: Encoding) -> Embedding:
    if isinstance(value, str):
        return Embedding(error=value)
    if encoding == "base64":
        return Embedding(vector_base64=base64.b64encode(
            np.asarray(value, dtype="<f4").tobytes()).decode("ascii"))
    return Embedding(vector=[float(x) for x in np.asarray(value, dtype=np.float32)])


def _add_error_answers(app: FastAPI) -> None:
    async def invalid(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        if "json" not in request.headers.get("content-type", ""):
            return _problem(422, "Send the body as JSON, with 'Content-Type: application/json'.")
        return _problem(422, one_sentence(error.errors()))

    answers: dict[type[Exception], Callable[[Exception], Response]] = {
        TooManyItems: lambda e: _problem(422, str(e)),
        BadInput: lambda e: _problem(422, str(e)),
        AtCapacity: lambda e: _problem(503, str(e), RETRY_AFTER_S),
        NotReady: lambda e: _problem(503, str(e), NOT_READY_RETRY_S),
        Unavailable: lambda e: _problem(503, str(e), NOT_READY_RETRY_S),
        UserError: lambda e: _problem(500, str(e)),  # a damaged store object, say
    }
    app.add_exception_handler(RequestValidationError, invalid)
    for kind, answer in answers.items():
        async def handler(_: Request, error: Exception, answer: Any = answer) -> Response:
            return answer(error)

        app.add_exception_handler(kind, handler)


def create_app(settings: Settings, options: ServeOptions,
               on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """The service for ``settings`` (model, store, database, fetch limits) and ``options``."""
    metrics = ServeMetrics()
    service = Service(settings, options, metrics, on_fatal)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title="sim-pipeline", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # /docs is served offline, below
                  summary="Caption-image similarity, online: the batch pipeline's fetch guard, "
                          "caches and model behind HTTP.")
    app.state.service = service
    _add_routes(app, service, metrics, options)
    _add_offline_docs(app)
    _add_error_answers(app)
    app.add_middleware(BodyLimitMiddleware, limit=options.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, keys=options.api_keys)
    paths = frozenset(getattr(route, "path", "") for route in app.routes)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics, paths=paths)
    return app


def _add_routes(app: FastAPI, service: Service, metrics: ServeMetrics,
                options: ServeOptions) -> None:
    def check_items(count: int, what: str) -> None:
        if count > options.max_items:
            raise TooManyItems(f"A request may carry at most {options.max_items} {what} "
                               f"(--max-items); this one has {count}.")

    @app.post("/v1/score", response_model=ScoreResponse, responses=REFUSALS)
    async def score(body: ScoreRequest, request: Request) -> ScoreResponse | Response:
        """Score each (image URL, caption) pair: similarity, cosine, or an error code."""
        check_items(len(body.pairs), "pairs")
        with service.admitted(len(body.pairs)):
            answer = await until_disconnected(request, service.score(body.pairs, body.record),
                                              metrics)
        if isinstance(answer, Response):
            return answer
        run_id, scored = answer
        return ScoreResponse(model=service.settings.model, run_id=run_id, results=[
            PairResult(similarity=s.similarity, cosine=s.cosine, error=s.error) for s in scored])

    @app.post("/v1/embed/images", response_model=EmbedResponse, responses=REFUSALS)
    async def embed_images(body: EmbedImagesRequest, request: Request) -> EmbedResponse | Response:
        """Unit vectors of images given as base64 bytes or as store keys of fetched images."""
        check_items(len(body.images), "images")
        with service.admitted(len(body.images)):
            answer = await until_disconnected(request, service.image_vectors(body.images),
                                              metrics)
        if isinstance(answer, Response):
            return answer
        metrics.count_errors(v for v in answer if isinstance(v, str))
        return _embed_response(service, answer, body.encoding)

    @app.post("/v1/embed/texts", response_model=EmbedResponse, responses=REFUSALS)
    async def embed_texts(body: EmbedTextsRequest, request: Request) -> EmbedResponse | Response:
        """Unit vectors of captions (truncated at the model's token limit)."""
        check_items(len(body.texts), "texts")
        with service.admitted(len(body.texts)):
            answer = await until_disconnected(request, service.text_vectors(body.texts), metrics)
        if isinstance(answer, Response):
            return answer
        return _embed_response(service, list(answer), body.encoding)

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        """The process is alive (liveness probe); says nothing about the model or database."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
    async def readyz() -> Readiness | JSONResponse:
        """Model loaded, object store and results database reachable (readiness probe)."""
        checks = await service.readiness()
        ready = checks["model"] == "loaded" and checks["store"] == checks["database"] == "ok"
        answer = Readiness(ready=ready, **checks)
        return answer if ready else JSONResponse(answer.model_dump(), status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        """Prometheus text format; docs/service.md lists the metrics."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _add_offline_docs(app: FastAPI) -> None:
    """``/docs`` with Swagger UI's files from the installed ``swagger-ui-bundle`` package.

    FastAPI's default page loads them from a public CDN, so it renders blank on a cluster
    without internet; this is FastAPI's documented self-hosting, with the files from a pinned
    package instead of a copy in the repository. The validator badge is off: it would call
    validator.swagger.io.
    """
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - API",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon-32x32.png",
            oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
            swagger_ui_parameters={"validatorUrl": None})

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()


def _embed_response(service: Service, values: list[VectorOrCode],
                    encoding: Encoding) -> EmbedResponse:
    dimensions = next((len(v) for v in values if not isinstance(v, str)), 0)
    return EmbedResponse(model=service.settings.model, dimensions=dimensions,
                         embeddings=[_embedding(v, encoding) for v in values])
