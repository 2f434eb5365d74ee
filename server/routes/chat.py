"""``POST /v1/chat/completions``: OpenAI-compatible, with ``video_url`` and ``image_url`` parts.

Streaming sends ``chat.completion.chunk`` events: the first delta carries the role, the last
chunk the ``finish_reason``, ``stream_options.include_usage`` adds a usage chunk, then
``[DONE]``. Progress while a video is extracted, and per-frame relevance when asked for, travel
as chunks with empty ``choices`` and a ``llamavid`` field, which OpenAI clients pass through.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from ..answers import Conversation, build_job, chain, collect_or_abort, normalise_turns, start
from ..deps import Engine, Ingest, ServerSettings
from ..errors import APIError, error_body
from ..ingest import video_ref
from ..jobs import Event
from ..protocol import ChatCompletionRequest, ImagePart, TextPart, VideoPart, usage

router = APIRouter()


async def conversation_from_chat(req: ChatCompletionRequest, ingest, settings) -> Conversation:
    system: str | None = None
    turns: list[tuple[str, str]] = []
    visual: list[tuple[str, ImagePart | VideoPart]] = []
    for i, message in enumerate(req.messages):
        content = message.content
        if content is None:
            content = ""
        if isinstance(content, str):
            text = content
        else:
            texts = []
            for j, part in enumerate(content):
                if isinstance(part, TextPart):
                    texts.append(part.text)
                elif message.role != "user":
                    raise APIError(400, f"{message.role} messages may only contain text", code="invalid_messages",
                                   param=f"messages[{i}].content[{j}]")
                else:
                    visual.append((f"messages[{i}].content[{j}]", part))
            text = "\n".join(texts)
        if message.role == "system":
            system = text if system is None else system + "\n" + text
        else:
            turns.append((message.role, text))
    conversation = Conversation(normalise_turns(turns, settings), system)
    urls = {(p.type, (p.video_url if isinstance(p, VideoPart) else p.image_url).url) for _, p in visual}
    if len(urls) > 1:
        raise APIError(400, "only one video or image per conversation is supported", code="too_many_media",
                       param=visual[1][0])
    if visual:
        where, part = visual[-1]
        if isinstance(part, VideoPart):
            record = await ingest.video_from_url(part.video_url.url, req, field=f"{where}.video_url")
            conversation.media = video_ref(record)
            conversation.notes["video_id"] = record.id
            conversation.notes["frames"] = record.frames_total
        else:
            conversation.media = await ingest.image_from_url(part.image_url.url, field=f"{where}.image_url")
            conversation.notes["frames"] = 1
    return conversation


def check_context(conversation: Conversation, card) -> None:
    """Refuse up front a video whose visual tokens alone cannot fit the model's context."""
    frames = conversation.notes.get("frames") or 0
    visual = frames * card.tokens_per_frame
    text = sum(len(m["content"]) for m in conversation.messages) // 4
    if visual + text >= card.context_length:
        raise APIError(400, f"{frames} frames x {card.tokens_per_frame} tokens = {visual} visual tokens do not fit the "
                            f"model's context of {card.context_length} tokens; lower fps or max_frames",
                       code="context_length_exceeded")


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request, engine: Engine, ingest: Ingest,
                           settings: ServerSettings):
    card = await engine.model_card()
    if card is None:
        raise APIError(503, "no GPU worker is running: none has reported a model yet", code="no_worker",
                       headers={"Retry-After": "5"})
    conversation = await conversation_from_chat(req, ingest, settings)
    check_context(conversation, card)
    job = build_job(conversation, req, settings, max_tokens=req.max_tokens or req.max_completion_tokens,
                    template=req.template)
    first, rest, stream = await start(engine, job)
    completion_id = "chatcmpl-" + job.request_id.split("-", 1)[1]
    created = int(time.time())
    extension = {k: v for k, v in conversation.notes.items() if k == "video_id"}
    if not req.stream:
        try:
            result = await collect_or_abort(chain(first, rest), request.is_disconnected)
        finally:
            stream.cancel()
        body = {
            "id": completion_id, "object": "chat.completion", "created": created, "model": card.id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": _usage(result.usage),
        }
        if result.relevance is not None:
            extension["relevance"] = result.relevance
        if extension:
            body["llamavid"] = extension
        return JSONResponse(body)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    events = _chunks(chain(first, rest), stream, completion_id, created, card.id, include_usage, extension)
    return EventSourceResponse(events, ping=15, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _usage(done: dict | None) -> dict | None:
    if not done:
        return None
    return usage(done["prompt_tokens"], done["completion_tokens"], done["visual_tokens"])


async def _chunks(events: AsyncIterator[Event], stream, cid: str, created: int, model: str, include_usage: bool,
                  extension: dict) -> AsyncIterator[dict]:
    def chunk(choices: list, **extra) -> dict:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": choices, **extra}
        return {"data": json.dumps(body, separators=(",", ":"))}

    def delta(content: dict, finish_reason: str | None = None) -> list:
        return [{"index": 0, "delta": content, "finish_reason": finish_reason, "logprobs": None}]

    try:
        role_sent = False
        async for event in events:
            if event.type == "progress":
                yield chunk([], llamavid={"type": "progress", **extension, **event.data})
            elif event.type == "relevance":
                yield chunk([], llamavid={"type": "relevance", **extension, **event.data})
            elif event.type == "delta":
                if not role_sent:
                    yield chunk(delta({"role": "assistant", "content": ""}))
                    role_sent = True
                if event.data["text"]:
                    yield chunk(delta({"content": event.data["text"]}))
            elif event.type == "done":
                if not role_sent:
                    yield chunk(delta({"role": "assistant", "content": ""}))
                yield chunk(delta({}, event.data["finish_reason"]))
                if include_usage:
                    yield chunk([], usage=_usage(event.data))
            elif event.type == "error":
                data = event.data
                yield {"data": json.dumps(error_body(int(data.get("status", 500)), data.get("message", "error"),
                                                     data.get("code")))}
        yield {"data": "[DONE]"}
    finally:
        stream.cancel()
