"""Start a process of the service: ``serve`` (everything), ``api`` or ``worker`` (split deployment)."""

from __future__ import annotations

import logging

from .settings import Settings

log = logging.getLogger(__name__)


def run(command: str, settings: Settings, *, log_level: str = "info") -> int:
    import uvicorn

    if command == "serve":
        from .app import create_app

        app = create_app(settings)
    elif command == "api":
        if not settings.redis_url:
            log.error("`llamavid api` needs REDIS_URL (or LLAMAVID_REDIS_URL); use `llamavid serve` for one process")
            return 2
        from .app import create_app
        from .redis_engine import redis_engine_factory

        app = create_app(settings, redis_engine_factory)
    elif command == "worker":
        if not settings.redis_url:
            log.error("`llamavid worker` needs REDIS_URL (or LLAMAVID_REDIS_URL)")
            return 2
        from .worker.main import run_worker

        return run_worker(settings)
    else:
        raise ValueError(command)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level, timeout_graceful_shutdown=5)
    return 0
