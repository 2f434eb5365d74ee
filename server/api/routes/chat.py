"""``POST /v1/chat/completions``: OpenAI-compatible, with ``video_url`` and ``image_url`` parts."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from ..deps import Engine, Ingest, ServerSettings, require_card
from ..errors import APIError
from ..ingest import MediaIngest, question_subtitles
from ..protocol import ChatCompletionRequest, ImagePart, TextPart, VideoPart
from ..serving import Conversation, build_job, check_context, collect, no_video_fields, normalise_turns, start
from ..sse import chat_chunks, done_usage, moments_body, video_usage

router = APIRouter()


async def conversation_from_chat(req: ChatCompletionRequest, ingest: MediaIngest, settings,
                                 long_video: bool) -> Conversation:
    system: str | None = None
    turns: list[tuple[str, str]] = []
    visual: list[tuple[str, ImagePart | VideoPart]] = []
    for i, message in enumerate(req.messages):
        content = message.content or ""
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
    conversation = Conversation(normalise_turns(turns, settings), system, frame_selection=req.frame_selection)
    if not any(isinstance(part, VideoPart) for _, part in visual):
        no_video_fields(req)
    subtitles = await ingest.subtitles(req.subtitles)
    urls = {(p.type, (p.video_url if isinstance(p, VideoPart) else p.image_url).url) for _, p in visual}
    if len(urls) > 1:
        raise APIError(400, "only one video or image per conversation is supported", code="too_many_media",
                       param=visual[1][0])
    if visual:
        where, part = visual[-1]
        if isinstance(part, VideoPart):
            record = await ingest.video_from_url(part.video_url.url, req, field=f"{where}.video_url")
            conversation.media, conversation.video_id = record.ref(), record.id
            conversation.frames = record.frames_total or 0
            conversation.subtitles = question_subtitles(subtitles, record, long_video=long_video)
        else:
            conversation.media = await ingest.image_from_url(part.image_url.url, field=f"{where}.image_url")
            conversation.frames = 1
    return conversation


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request, engine: Engine, ingest: Ingest,
                           settings: ServerSettings):
    card = await require_card(engine)
    conversation = await conversation_from_chat(req, ingest, settings, card.long_video)
    job = build_job(conversation, req, settings, max_tokens=req.max_tokens or req.max_completion_tokens,
                    template=req.template)
    check_context(conversation, card)
    events, stream = await start(engine, job, request)
    completion_id = "chatcmpl-" + job.request_id.split("-", 1)[1]
    created = int(time.time())
    extension = {"video_id": conversation.video_id} if conversation.video_id else {}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunks = chat_chunks(events, stream, completion_id=completion_id, created=created, model=card.id,
                             include_usage=include_usage, extension=extension, base_url=str(request.base_url))
        return EventSourceResponse(chunks, ping=15, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    result = await collect(events, stream, request)
    body = {
        "id": completion_id, "object": "chat.completion", "created": created, "model": card.id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": result.done.finish_reason if result.done else None, "logprobs": None}],
        "usage": done_usage(result.done) if result.done else None,
    }
    if result.done is not None:
        extension.update(video_usage(result.done))
    if result.relevance is not None:
        extension["relevance"] = {"frames": [f.model_dump() for f in result.relevance.frames]}
        extension["moments"] = moments_body(result.relevance, conversation.video_id, str(request.base_url))
    if extension:
        body["llamavid"] = extension
    return JSONResponse(body)
