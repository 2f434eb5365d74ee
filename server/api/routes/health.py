"""Liveness, readiness, metrics and the model list."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from ..deps import Engine, ServerSettings, require_api_key

router = APIRouter()


@router.get("/health")
async def health() -> dict:
    """Alive: the process answers. Says nothing about the model or the cache."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Ready: a model is loaded (here or in a worker) and the feature cache answers."""
    engine = getattr(request.app.state, "engine", None)
    checks = {"model": False, "cache": False}
    if engine is not None:
        try:
            checks = await engine.ready()
        except Exception as exc:  # a broken backend means "not ready", never a 500
            checks = {"model": False, "cache": False, "error": f"{type(exc).__name__}: {exc}"}
    ok = all(v for k, v in checks.items() if k != "error")
    return JSONResponse({"status": "ready" if ok else "not_ready", **checks}, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.exposition(request.headers.get("accept"))
    return Response(body, media_type=content_type)


@router.get("/metrics/workers")
async def worker_targets(engine: Engine) -> list[dict]:
    """The live workers' metrics endpoints in Prometheus's HTTP service-discovery format
    (``http_sd_configs: [{url: http://api:8000/metrics/workers}]``): workers take free ports and
    come and go, and each advertises where its ``/metrics`` is in its card."""
    targets = []
    for card in await engine.workers():
        url = urlsplit(str(card.get("metrics_url", "")))
        if url.hostname and url.port:
            labels = {"worker_id": str(card.get("worker_id", "")), "model": str(card.get("id", ""))}
            if "gpu" in card:
                labels["gpu"] = str(card["gpu"])
            targets.append({"targets": [f"{url.hostname}:{url.port}"], "labels": labels})
    return targets


@router.get("/v1/models", dependencies=[Depends(require_api_key)])  # health and metrics stay open
async def models(engine: Engine, settings: ServerSettings) -> dict:
    card = await engine.model_card()
    if card is None:
        return {"object": "list", "data": []}
    entry = {
        "id": card.id, "object": "model", "created": int(time.time()), "owned_by": "llamavid",
        "root": card.path, "max_model_len": card.context_length,
        "llamavid": {"tokens_per_frame": card.tokens_per_frame, "device": card.device, "dtype": card.dtype,
                     "demo": card.demo, "kv_positions": card.kv_positions,
                     "long_video": card.long_video, "speech_to_text": card.asr,
                     # several videos and images per conversation: no checkpoint was trained on it
                     "experimental": ["multiple_media"], "max_media": settings.max_media,
                     # what a client may ask for, so the page can check its settings before sending
                     "limits": {"max_fps": settings.max_fps, "max_frames": settings.max_frames,
                                "max_tokens": settings.max_tokens_limit,
                                "max_question_chars": settings.max_question_chars,
                                "max_video_bytes": settings.max_video_bytes, "max_media": settings.max_media,
                                "max_total_frames": settings.max_total_frames}},
    }
    if card.demo == "random":
        entry["llamavid"]["warning"] = "random demo weights: answers are noise. Start with --model DIR for real answers."
    return {"object": "list", "data": [entry]}
