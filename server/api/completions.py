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
from .media_fields import chat_media, frame_options
from .protocol import ChatCompletionRequest, ImagePart, TextPart, VideoPart
from .serving import (
    Collected,
    CollectedAnswer,
    Conversation,
    Gone,
    build_job,
    check_context,
    collect,
    no_video_fields,
    normalise_turns,
    start,
)
from .sse import done_usage, moments_body, relevance_body, video_usage


async def conversation_from_chat(req: ChatCompletionRequest, ingest: MediaIngest, settings: Settings,
                                 long_video: bool) -> Conversation:
    system: str | None = None
    turns: list[tuple[str, str]] = []
    visual: list[tuple[str, ImagePart | VideoPart, int]] = []  # (param, part, index of its turn in ``turns``)
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
                    visual.append((f"messages[{i}].content[{j}]", part, len(turns)))
            text = "\n".join(texts)
        if message.role == "system":
            system = text if system is None else system + "\n" + text
        else:
            turns.append((message.role, text))
    conversation = Conversation(normalise_turns(turns, settings), system, frame_selection=req.frame_selection)
    if not any(isinstance(part, VideoPart) for _, part, _ in visual):
        no_video_fields(req)
    visual = _distinct(visual)
    if len(visual) > settings.max_media:
        raise APIError(400, f"a conversation may carry at most {settings.max_media} videos and images "
                            f"(max_media); this one has {len(visual)}", code="too_many_media",
                       param=visual[settings.max_media][0])
    subtitles = await ingest.subtitles(req.subtitles)
    if subtitles is not None and subtitles.source == "file" and len(visual) > 1:
        raise APIError(400, "a subtitles file goes with one video; with several, upload each video with its own "
                            "subtitles (POST /v1/videos) or use 'auto'", code="invalid_request", param="subtitles")
    options = frame_options(req)
    merged = _merged_turns([role for role, _ in turns])
    frames = 0
    for where, part, turn in visual:
        media, record = await chat_media(ingest, part, options, where)
        if record is not None:
            frames += record.frames_total or 0
            if frames > settings.max_total_frames:
                raise APIError(400, f"the conversation's videos sample more than {settings.max_total_frames} frames "
                                    "in all (max_total_frames); lower fps or max_frames, or send fewer videos",
                               code="too_many_frames", param=where)
            video_subtitles = question_subtitles(subtitles, record, long_video=long_video)
            conversation.video_id = conversation.video_id or record.id
            conversation.subtitles = conversation.subtitles if conversation.media else video_subtitles
        else:
            frames, video_subtitles = frames + 1, None
        if len(visual) > 1:  # where each block goes, and each video's own subtitles
            media = media.model_copy(update={"turn": merged[turn], "subtitles": video_subtitles})
        conversation.media.append(media)
        conversation.video_ids.append(record.id if record is not None else None)
    conversation.frames = frames
    return conversation


def _distinct(visual: list[tuple[str, ImagePart | VideoPart, int]]) -> list[tuple[str, ImagePart | VideoPart, int]]:
    """The media parts less repeats of one (same type and URL, or same uuid): a client that resends
    the conversation's video with every turn means one video (placed where it first came)."""
    seen: set[tuple[str, str]] = set()
    out = []
    for item in visual:
        part = item[1]
        keys = {(part.type, "url:" + part.ref().url) if part.ref() else None, ("uuid", part.uuid) if part.uuid else None}
        keys.discard(None)
        if not keys & seen:
            out.append(item)
        seen |= keys
    return out


def _merged_turns(roles: list[str]) -> list[int]:
    """Where each turn lands once consecutive turns of one role are merged (``normalise_turns``)."""
    out: list[int] = []
    for k, role in enumerate(roles):
        out.append(0 if k == 0 else out[-1] + (role != roles[k - 1]))
    return out


@dataclass
class ChatJob:
    job: QuestionJob
    conversation: Conversation
    card: ModelCard

    @property
    def completion_id(self) -> str:
        return "chatcmpl-" + self.job.request_id.split("-", 1)[1]

    def extension(self) -> dict:
        """The ``llamavid`` field every response carries for a video question (and, with several
        media, which is which: ``media``, in the order given)."""
        out = {"video_id": self.conversation.video_id} if self.conversation.video_id else {}
        if len(self.conversation.media) > 1:
            out["media"] = [{"index": i, "kind": m.kind, "video_id": v}
                            for i, (m, v) in enumerate(zip(self.conversation.media, self.conversation.video_ids))]
        return out


async def chat_job(req: ChatCompletionRequest, engine: EngineClient, ingest: MediaIngest,
                   settings: Settings, card: ModelCard) -> ChatJob:
    """Everything judged before the question is queued: media fetched and registered, limits checked."""
    conversation = await conversation_from_chat(req, ingest, settings, card.long_video)
    answers = {"n": req.n, "grammar": req.grammar(),
               "logprobs": (req.top_logprobs or 0) if req.logprobs else None}
    job = build_job(conversation, req, settings, max_tokens=req.max_tokens or req.max_completion_tokens,
                    template=req.template, answers=answers)
    check_context(conversation, card)
    return ChatJob(job, conversation, card)


def completion_body(chat: ChatJob, result: Collected, *, created: int, base_url: str) -> dict:
    """A ``chat.completion`` object from a collected answer."""
    done = result.done
    choices = []
    for index in range(chat.job.sampling.n):
        answer = result.answers.get(index, CollectedAnswer())
        logprobs = None
        if answer.logprobs is not None:
            logprobs = {"content": [entry.model_dump() for entry in answer.logprobs], "refusal": None}
        choices.append({"index": index, "message": {"role": "assistant", "content": answer.text},
                        "finish_reason": answer.finish_reason, "logprobs": logprobs})
    body = {
        "id": chat.completion_id, "object": "chat.completion", "created": created, "model": chat.card.id,
        "choices": choices, "usage": done_usage(done) if done else None,
    }
    extension = chat.extension()
    if done is not None:
        extension.update(video_usage(done))
    if result.relevance is not None and result.relevance.media_index is None:
        extension["relevance"] = {"frames": [f.model_dump() for f in result.relevance.frames]}
        extension["moments"] = moments_body(result.relevance, chat.conversation.video_id, base_url)
    elif result.relevances:  # several media: per video
        extension["relevance"] = [relevance_body(event, event.video_id, base_url) for event in result.relevances]
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
