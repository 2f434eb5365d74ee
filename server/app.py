"""``create_app``: the FastAPI application, wired to an engine by its lifespan.

The engine is built in the background after the server starts listening, so ``/health``
answers while a large model loads and ``/ready`` turns 200 only once the model is loaded and
warmed up. Tests may pass a ready-made ``engine_factory``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .deps import require_api_key
from .engine import EngineClient
from .errors import error_response, install_error_handlers
from .ingest import MediaIngest
from .metrics import LlamaVidMetrics
from .routes import chat, health, videos
from .settings import Settings
from .thumbnails import ThumbnailCache

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings, LlamaVidMetrics], Awaitable[EngineClient]]
STATIC_DIR = Path(__file__).parent / "static"


def create_app(settings: Settings, engine_factory: EngineFactory | None = None) -> FastAPI:
    metrics = LlamaVidMetrics()
    factory = engine_factory or local_engine_factory

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = None
        app.state.startup_error = None

        async def build() -> None:
            try:
                engine = await factory(settings, metrics)
            except Exception as exc:  # keep serving /health; /ready reports the failure
                log.exception("could not start the engine")
                app.state.startup_error = f"{type(exc).__name__}: {exc}"
                return
            app.state.ingest = MediaIngest(settings, engine, metrics)
            app.state.engine = engine

        task = asyncio.ensure_future(build())
        try:
            yield
        finally:
            task.cancel()
            if app.state.engine is not None:
                await app.state.engine.close()

    app = FastAPI(title="LLaMA-VID", version="0.1.0", lifespan=lifespan,
                  description="Ask questions about long videos: two tokens per frame, cached features, streamed answers.")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.thumbnails = ThumbnailCache()
    install_error_handlers(app)
    api = [Depends(require_api_key)]
    app.include_router(health.router)
    app.include_router(chat.router, dependencies=api)
    app.include_router(videos.router, dependencies=api)
    if STATIC_DIR.is_dir():
        app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="page")
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(BodyLimit, max_bytes=max(settings.max_video_bytes, settings.max_image_bytes * 2) + (1 << 20))
    app.add_middleware(HTTPMetrics, metrics=metrics)
    return app


async def local_engine_factory(settings: Settings, metrics: LlamaVidMetrics) -> EngineClient:
    """The embedded engine: model, in-memory feature cache and registry in this process."""
    from cache import MemoryFeatureStore

    from .cache_metrics import CacheMetrics
    from .engine import LocalEngine
    from .storage import DiskMediaStore, MemoryVideoRegistry
    from .worker.loading import load_model, warmup
    from .worker.runner import ModelRunner

    model, card = await asyncio.to_thread(load_model, settings)
    await asyncio.to_thread(warmup, model)
    store = MemoryFeatureStore(settings.cache_bytes)
    media = DiskMediaStore(settings.media_dir, settings.media_bytes)
    registry = MemoryVideoRegistry()
    cache_metrics = CacheMetrics(metrics, store)
    runner = ModelRunner(model, store, media, registry, metrics, max_running=settings.max_running,
                         encode_batch=settings.encode_batch, batch_capacity=settings.batch_capacity, template=settings.template,
                         on_cache_access=cache_metrics.sync)
    metrics.set_model_info(card.id, card.dtype, card.device, card.demo is not None)
    log.info("ready: %s on %s (%s), %d tokens per frame", card.id, card.device, card.dtype, card.tokens_per_frame)
    return LocalEngine(runner, card, registry, media, metrics, queue_size=settings.queue_size,
                       max_running=settings.max_running, video_queue_size=settings.video_queue_size)


class BodyLimit:
    """Refuse request bodies past ``max_bytes`` while they stream in (413), declared or not."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(413, f"the request body is {int(declared)} bytes; the limit is {self.max_bytes}",
                                      "request_too_large")
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(413, f"the request body exceeds {self.max_bytes} bytes")
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            response = error_response(413, f"the request body exceeds {self.max_bytes} bytes", "request_too_large")
            await response(scope, receive, send)


class _TooLarge(StarletteHTTPException):
    """An HTTPException, so that body parsing re-raises it and the error handler answers 413."""


class HTTPMetrics:
    """Counts responses by route template and status."""

    def __init__(self, app: ASGIApp, metrics: LlamaVidMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def record(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or ("/" if scope.get("path") == "/" else "other")
            self.metrics.http_request(path, status)
