"""The FastAPI application: lifespan (load, watch, stop), middleware, routes and the web page."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import swagger_ui_bundle
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.engine import Engine
from service.errors import BodyTimeout, TooLarge, error_response, install_error_handlers
from service.metrics import Metrics, MetricsMiddleware
from service.routes import admin, gallery, search, status, video
from service.settings import Settings
from service.thumbnails import ThumbnailCache

STATIC = Path(__file__).parent / "static"
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]
DESCRIPTION = """\
Cross-modal search over a gallery: text -> images and image -> captions.

One tower of the exported bundle encodes the query (ONNX Runtime), FAISS searches the other
modality's index, and gallery metadata is attached. `score` is the cosine similarity of the
query and hit embeddings. Every error is JSON: `{"detail": "...", "code": "..."}`.
When the service has an API key, send it as `X-API-Key` or `Authorization: Bearer`.
"""


class BodyLimitMiddleware:
    """Guards request bodies on their way in: over `max_bytes` is 413 (at once by
    Content-Length, else as the chunks arrive), and a body that stops short, no chunk for
    `timeout_s`, is 408 instead of holding the connection until the client gives up."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and (len(length) > 18 or int(length) > self.max_bytes):
            response = error_response(
                413, f"request body over the limit of {self.max_bytes} bytes", "too_large"
            )
            await response(scope, receive, send)
            return
        received, complete = 0, False

        async def guarded() -> Message:
            nonlocal received, complete
            if complete:  # later calls wait for a disconnect: no timeout there
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                raise BodyTimeout(
                    f"the request body stalled: nothing arrived for {self.timeout_s:g} s"
                ) from None
            received += len(message.get("body", b""))
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            if received > self.max_bytes:
                raise TooLarge(f"request body over the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, guarded, send)


def lifespan_of(settings: Settings, metrics: Metrics) -> Lifespan:
    """The app's life: the engine starts, loads the bundle and CURRENT in the background and
    watches CURRENT; on the way out its tasks are cancelled and its pools stopped."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = Engine(settings, metrics)  # a bundle/index mismatch stops start-up here
        app.state.engine = engine
        await engine.start()
        tasks = [asyncio.create_task(engine.load())]
        if settings.watch_interval_s > 0:
            tasks.append(asyncio.create_task(engine.watch()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await engine.stop()

    return lifespan


def add_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """Body limits and the read timeout, CORS when origins are configured, request metrics
    (outermost, so every answer is counted)."""
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "X-API-Key", "Authorization"],
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)


def include_routes(app: FastAPI) -> None:
    """The resources' routers, the web page and its static files."""
    app.include_router(status.probes)
    for resource in (search, gallery):
        app.include_router(resource.router)
    app.include_router(status.router)  # /info and /metrics
    app.include_router(video.router)
    app.include_router(admin.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")


def add_docs(app: FastAPI) -> None:
    """/docs: Swagger UI from the installed assets (no CDN); ReDoc has no packaged assets, so
    it is off."""
    app.mount("/docs/assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API",
            swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
            swagger_favicon_url=f"{root}/docs/assets/favicon-32x32.png",
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app for `settings` (default: from COTS_* environment variables)."""
    # bundle and index are required: they come from COTS_BUNDLE and COTS_INDEX here.
    settings = settings or Settings()  # type: ignore[call-arg]
    metrics = Metrics()
    app = FastAPI(
        title="cots search",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan_of(settings, metrics),
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.thumbnails = ThumbnailCache(settings.thumbnail_cache)
    install_error_handlers(app)
    add_middleware(app, settings, metrics)
    include_routes(app)
    add_docs(app)
    return app
