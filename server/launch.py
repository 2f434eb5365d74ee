"""Start a process of the service: ``serve`` (everything), ``api`` or ``worker`` (split deployment).

The composition root: the only module that picks an engine for the HTTP app. Imports stay inside
the branches, so ``llamavid api`` never loads the worker (nor torch).
"""

from __future__ import annotations

import logging

from .settings import Settings

log = logging.getLogger(__name__)


def run(command: str, settings: Settings, *, log_level: str = "info") -> int:
    if command not in ("serve", "api", "worker"):
        raise ValueError(command)
    if command != "serve" and not settings.redis_url:
        log.error("`llamavid %s` needs REDIS_URL (or LLAMAVID_REDIS_URL)%s", command,
                  "; use `llamavid serve` for one process" if command == "api" else "")
        return 2
    if command == "worker":  # before CUDA starts: `--device cuda:N` makes GPU N the only one it sees
        from .worker.startup import StartupError, pin_device

        try:
            settings = pin_device(settings)
        except StartupError as exc:
            log.error("%s", exc)
            return exc.code
    if command in ("serve", "worker"):  # before anything starts: a model that cannot fit never reports ready
        from .worker.loading import PlanError, check_plan, plan_for

        try:
            check_plan(plan_for(settings, hot_tier=command == "worker"), settings.model)
        except PlanError as exc:
            log.error("%s", exc)
            return 2
    if command == "worker":
        from .worker.main import run_worker

        return run_worker(settings)

    import uvicorn

    from .api.app import create_app

    batch_store = None  # serve: in this process
    if command == "serve":
        from .worker.local import local_engine_factory as factory
    else:
        from .engine.redis.batches import redis_batch_store as batch_store
        from .engine.redis.client import redis_engine_factory as factory
    from .demo_clips import make_demo_clip  # offered only while the trained demo model is served

    app = create_app(settings, factory, demo_clips=make_demo_clip, batch_store=batch_store)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level, timeout_graceful_shutdown=5)
    return 0
