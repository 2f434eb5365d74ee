"""FastAPI dependencies: the app's engine, ingest, settings and metrics, and bearer-key auth."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from ..engine.protocol import EngineClient, ModelCard
from ..metrics import LlamaVidMetrics
from ..settings import Settings
from .errors import APIError
from .ingest import MediaIngest


def _engine(request: Request) -> EngineClient:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise APIError(503, "the service is starting: the model is not loaded yet", code="not_ready",
                       headers={"Retry-After": "5"})
    return engine


def _ingest(request: Request) -> MediaIngest:
    _engine(request)
    return request.app.state.ingest


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _metrics(request: Request) -> LlamaVidMetrics:
    return request.app.state.metrics


async def require_card(engine: EngineClient) -> ModelCard:
    """The served model's card, or 503 while no worker has reported one."""
    card = await engine.model_card()
    if card is None:
        raise APIError(503, "no GPU worker is running: none has reported a model yet", code="no_worker",
                       headers={"Retry-After": "5"})
    return card


def require_api_key(request: Request) -> None:
    """Bearer auth when ``LLAMAVID_API_KEYS`` is set; health, metrics and the page stay open."""
    keys: list[str] = request.app.state.settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    if not any(hmac.compare_digest(token.strip(), key) for key in keys):
        raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


Engine = Annotated[EngineClient, Depends(_engine)]
Ingest = Annotated[MediaIngest, Depends(_ingest)]
ServerSettings = Annotated[Settings, Depends(_settings)]
Metrics = Annotated[LlamaVidMetrics, Depends(_metrics)]
