"""``/v1/chat/completions`` without HTTP: a chat request -> a question job -> a response body.

The route streams or answers one request; the Batch API runs thousands of the same requests
with nobody connected. Both go through here, so a batch line gets exactly the answer the same
request would get from the route.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..engine.jobs import QuestionJob
from ..engine.protocol import EngineClient, ModelCard
from ..settings import Settings
from .errors import APIError
from .ingest import MediaIngest, question_subtitles
from .protocol import ChatCompletionRequest, ImagePart, TextPart, VideoPart
from .serving import Collected, Conversation, Gone, build_job, check_context, collect, no_video_fields, \
    normalise_turns, start
from .sse import done_usage, moments_body, video_usage


async def conversation_from_chat(req: ChatCompletionRequest, ingest: MediaIngest, settings: Settings,
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


@dataclass
class ChatJob:
    job: QuestionJob
    conversation: Conversation
    card: ModelCard

    @property
    def completion_id(self) -> str:
        return "chatcmpl-" + self.job.request_id.split("-", 1)[1]

    def extension(self) -> dict:
        """The ``llamavid`` field every response carries for a video question."""
        return {"video_id": self.conversation.video_id} if self.conversation.video_id else {}


async def chat_job(req: ChatCompletionRequest, engine: EngineClient, ingest: MediaIngest,
                   settings: Settings, card: ModelCard) -> ChatJob:
    """Everything judged before the question is queued: media fetched and registered, limits checked."""
    conversation = await conversation_from_chat(req, ingest, settings, card.long_video)
    job = build_job(conversation, req, settings, max_tokens=req.max_tokens or req.max_completion_tokens,
                    template=req.template)
    check_context(conversation, card)
    return ChatJob(job, conversation, card)


def completion_body(chat: ChatJob, result: Collected, *, created: int, base_url: str) -> dict:
    """A ``chat.completion`` object from a collected answer."""
    done = result.done
    body = {
        "id": chat.completion_id, "object": "chat.completion", "created": created, "model": chat.card.id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": done.finish_reason if done else None, "logprobs": None}],
        "usage": done_usage(done) if done else None,
    }
    extension = chat.extension()
    if done is not None:
        extension.update(video_usage(done))
    if result.relevance is not None:
        extension["relevance"] = {"frames": [f.model_dump() for f in result.relevance.frames]}
        extension["moments"] = moments_body(result.relevance, chat.conversation.video_id, base_url)
    if extension:
        body["llamavid"] = extension
    return body


async def complete_chat(req: ChatCompletionRequest, engine: EngineClient, ingest: MediaIngest,
                        settings: Settings, card: ModelCard, gone: Gone, *, base_url: str) -> dict:
    """One non-streaming chat completion; ``gone`` returning cancels it (the client left, the batch
    was cancelled). Failures raise ``APIError`` with the status the route would answer."""
    chat = await chat_job(req, engine, ingest, settings, card)
    events, stream = await start(engine, chat.job, gone)
    result = await collect(events, stream, gone)
    return completion_body(chat, result, created=int(time.time()), base_url=base_url)
