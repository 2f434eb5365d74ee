"""ASGI middleware: a streaming request-body limit and per-route HTTP metrics."""

from __future__ import annotations

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..metrics import LlamaVidMetrics
from .errors import error_response


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

        async def limited() -> Message:
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

        async def record(message: Message) -> None:
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
