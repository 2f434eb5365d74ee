"""``POST /v1/chat/completions``: OpenAI-compatible, with ``video_url`` and ``image_url`` parts."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from ..completions import chat_job, completion_body
from ..deps import Engine, Ingest, ServerSettings, require_card
from ..protocol import ChatCompletionRequest
from ..serving import client_gone, collect, start
from ..sse import chat_chunks

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request, engine: Engine, ingest: Ingest,
                           settings: ServerSettings):
    card = await require_card(engine)
    chat = await chat_job(req, engine, ingest, settings, card)
    gone = client_gone(request)
    events, stream = await start(engine, chat.job, gone)
    created = int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunks = chat_chunks(events, stream, completion_id=chat.completion_id, created=created, model=card.id,
                             include_usage=include_usage, extension=chat.extension(),
                             base_url=str(request.base_url), n=req.n)
        return EventSourceResponse(chunks, ping=15, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    result = await collect(events, stream, gone)
    return JSONResponse(completion_body(chat, result, created=created, base_url=str(request.base_url)))
