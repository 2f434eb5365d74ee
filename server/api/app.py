"""``create_app``: the FastAPI application, wired to an engine by its lifespan.

The engine is built in the background after the server starts listening, so ``/health``
answers while a large model loads and ``/ready`` turns 200 only once the engine is ready. Which
engine is the caller's choice (``server.launch``): the in-process worker for ``llamavid serve``,
the Redis client for ``llamavid api``; this module knows neither.
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
from starlette.types import Scope

from ..engine.batches import BatchStore, MemoryBatchStore
from ..engine.protocol import EngineClient
from ..metrics import LlamaVidMetrics
from ..settings import Settings
from .batch import BatchService
from .deps import require_api_key
from .errors import install_error_handlers
from .ingest import MediaIngest
from .middleware import BodyLimit, BodyLimitFor, HTTPMetrics
from .routes import batches, chat, demo, files, health, videos
from .thumbnails import ThumbnailCache

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings, LlamaVidMetrics], Awaitable[EngineClient]]
DemoClips = Callable[[int], tuple[bytes, str, list[dict]]]
BatchStoreFactory = Callable[[Settings], BatchStore]
STATIC_DIR = Path(__file__).resolve().parents[1] / "static"


def body_limits(settings: Settings) -> BodyLimitFor:
    """Each route's body limit: an upload its media limit, JSON the base64 of the largest medium it may
    carry as a ``data:`` URL plus the text limits, anything else 1 MiB."""
    form_overhead = 64 << 10  # multipart boundaries and the small fields beside the file
    text = 4 * settings.max_question_chars + (1 << 20)  # UTF-8 of the conversation, and the JSON around it
    json_limit = -(-max(settings.max_video_bytes, settings.max_image_bytes) // 3) * 4 + text
    media = "LLAMAVID_MAX_VIDEO_BYTES"

    def limit_for(scope: Scope) -> tuple[int, str]:
        if scope.get("method") != "POST":
            return 1 << 20, "the limit for this route"
        content_type = dict(scope.get("headers") or []).get(b"content-type", b"")
        if scope.get("path") == "/v1/videos" and content_type.startswith(b"multipart/"):
            return (settings.max_video_bytes + form_overhead,
                    f"the video upload limit ({media} plus form fields)")
        if scope.get("path") == "/v1/files":
            return (settings.max_batch_file_bytes + form_overhead,
                    "the batch file limit (LLAMAVID_MAX_BATCH_FILE_BYTES plus form fields)")
        return json_limit, f"the JSON body limit (a base64 data: URL of {media} plus the text limits)"

    return limit_for


def create_app(settings: Settings, engine_factory: EngineFactory,
               demo_clips: DemoClips | None = None, batch_store: BatchStoreFactory | None = None) -> FastAPI:
    """``demo_clips(i)``: the i-th demo clip (bytes, file name, questions), for ``POST /v1/demo/clip``;
    ``batch_store``: where batches and files are kept (default: in this process)."""
    metrics = LlamaVidMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = None
        app.state.startup_error = None

        async def build() -> None:
            try:
                engine = await engine_factory(settings, metrics)
            except Exception as exc:  # keep serving /health; /ready reports the failure
                log.exception("could not start the engine")
                app.state.startup_error = f"{type(exc).__name__}: {exc}"
                return
            app.state.ingest = MediaIngest(settings, engine, metrics)
            store = batch_store(settings) if batch_store is not None else MemoryBatchStore()
            app.state.batches = BatchService(store, engine, app.state.ingest, settings, metrics)
            app.state.engine = engine
            app.state.batches.start()  # and take over the batches whose runner died

        task = asyncio.ensure_future(build())
        try:
            yield
        finally:
            task.cancel()
            if app.state.engine is not None:
                await app.state.batches.close()
                await app.state.batches.store.close()
                await app.state.engine.close()

    app = FastAPI(title="LLaMA-VID", version="0.1.0", lifespan=lifespan,
                  description="Ask questions about long videos: two tokens per frame, cached features, "
                              "streamed answers.")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.thumbnails = ThumbnailCache()
    app.state.demo_clips = demo_clips
    install_error_handlers(app)
    api = [Depends(require_api_key)]
    app.include_router(health.router)
    app.include_router(chat.router, dependencies=api)
    app.include_router(videos.router, dependencies=api)
    app.include_router(demo.router, dependencies=api)
    app.include_router(files.router, dependencies=api)
    app.include_router(batches.router, dependencies=api)
    if STATIC_DIR.is_dir():
        app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="page")
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(BodyLimit, limit_for=body_limits(settings))
    app.add_middleware(HTTPMetrics, metrics=metrics)
    return app
