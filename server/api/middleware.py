"""ASGI middleware: a streaming request-body limit and per-route HTTP metrics."""

from __future__ import annotations

from collections.abc import Callable

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..metrics import LlamaVidMetrics
from .errors import error_response

BodyLimitFor = Callable[[Scope], tuple[int, str]]  # (bytes, what the limit is, for the message)


class BodyLimit:
    """Refuse a request body past its route's limit while it streams in (413), declared or not.

    Any response sent before the body was read to its end (this 413, a route's own 413 or 401, ...)
    closes the connection (``Connection: close``): otherwise the server would go on reading and
    discarding the rest, and a client sending a huge body would send all of it.
    """

    def __init__(self, app: ASGIApp, limit_for: BodyLimitFor) -> None:
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes, what = self.limit_for(scope)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            return await _refuse(f"the request body is {int(declared)} bytes; {what} is {max_bytes} bytes",
                                 scope, receive, send)
        seen = 0
        read_all = declared in (None, b"0") and b"transfer-encoding" not in headers  # no body at all

        async def limited() -> Message:
            nonlocal seen, read_all
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                read_all = not message.get("more_body", False)
                if seen > max_bytes:
                    raise _TooLarge(413, f"the request body exceeds {what}, {max_bytes} bytes")
            return message

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start" and not read_all:
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*kept, (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, limited, closing)
        except _TooLarge as exc:
            await _refuse(exc.detail, scope, receive, send)


async def _refuse(message: str, scope: Scope, receive: Receive, send: Send) -> None:
    response = error_response(413, message, "request_too_large", headers={"Connection": "close"})
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
