"""Every error leaves the API as OpenAI-style JSON: ``{"error": {message, type, param, code}}``.

Bad input is a 4xx that names the problem; a full queue is a 429 with ``Retry-After``; only a
bug is a 500, and even that is JSON.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.events import ErrorEvent
from ..engine.protocol import EngineUnavailable, QueueFull
from ..fetch.netguard import MediaError

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 408: "timeout_error", 409: "conflict_error", 410: "gone_error",
          413: "request_too_large", 415: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error"}
# Codes for errors raised by Starlette/FastAPI themselves (body parsing, routing, the body limit).
_HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def from_error_event(event: ErrorEvent) -> APIError:
    """The one place an engine's error event becomes an HTTP error (before any byte was sent)."""
    return APIError(event.status, event.message, code=event.code)


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error" if status >= 500 else "error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    parts, param, code = [], None, "invalid_request"
    for err in exc.errors()[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        if err.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {err.get('msg')}", None, "invalid_json"
        where = ".".join(loc) or "body"
        param = param or where
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        elif err.get("type") == "missing":
            msg = "field required"
        elif err.get("type") == "string_unicode":  # pydantic's wording for a lone UTF-16 surrogate
            msg = "is not valid Unicode text: it holds an unpaired UTF-16 surrogate"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts) or "invalid request", param, code


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(MediaError)
    async def _media_error(request: Request, exc: MediaError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.code)

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return error_response(429, str(exc), "queue_full", headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(EngineUnavailable)
    async def _unavailable(request: Request, exc: EngineUnavailable) -> JSONResponse:
        return error_response(503, exc.message, exc.code, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type")
        whole_body = any(e.get("loc") == ("body",) for e in exc.errors())
        if content_type and not _is_json(content_type) and whole_body:
            # FastAPI validates a non-JSON body as raw bytes; name the real problem instead.
            return error_response(415, f"unsupported Content-Type {content_type!r}: send the request as "
                                       "application/json", "unsupported_content_type")
        message, param, code = _validation_message(exc)
        return error_response(400, message, code, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message, _HTTP_CODES.get(exc.status_code),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")
