"""The two SSE encodings of a question's events.

* ``chat_chunks``: OpenAI ``chat.completion.chunk`` data lines (the first delta carries the role,
  the last chunk the finish reason, an optional usage chunk, then ``[DONE]``). Progress and
  relevance travel as chunks with empty ``choices`` and a ``llamavid`` field, which OpenAI
  clients pass through.
* ``ask_events``: named events ``progress``, ``relevance``, ``moments``, ``delta``, ``done``, ``error``.

A video answer says how many of the video's frames the LLM saw (``frames_used`` of
``frames_total``: they are thinned when they do not all fit its context) and where its subtitles
came from; moments carry the URL of their most relevant frame's thumbnail.

Both cancel the stream when the client goes away (sse-starlette closes the generator).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from ..engine.events import AnyEvent, DeltaEvent, DoneEvent, ErrorEvent, ProgressEvent, RelevanceEvent
from ..engine.protocol import EventStream
from .errors import error_body
from .protocol import usage


def _json(body: Any) -> str:
    return json.dumps(body, separators=(",", ":"))


def done_usage(done: DoneEvent) -> dict:
    return usage(done.prompt_tokens, done.completion_tokens, done.visual_tokens)


def _error(event: ErrorEvent) -> dict:
    return error_body(event.status, event.message, event.code)


def video_usage(done: DoneEvent) -> dict:
    """What of the video the answer used; empty for an image or text question."""
    if done.frames_total is None:
        return {}
    used = {"frames_used": done.frames_used, "frames_total": done.frames_total,
            "subtitles": {"source": done.subtitles, "cues": done.subtitle_cues} if done.subtitles else None}
    if done.media:  # several media: what each one used (the counts above sum the videos)
        used["media"] = [m.model_dump() for m in done.media]
    return used


def moments_body(event: RelevanceEvent, video_id: str | None, base_url: str) -> list[dict]:
    """The moments with the URL of each one's thumbnail (the span's most relevant frame)."""
    out = []
    for moment in event.moments:
        body = moment.model_dump()
        if video_id:
            body["thumbnail_url"] = f"{base_url.rstrip('/')}/v1/videos/{video_id}/frames/{moment.frame}.jpg"
        out.append(body)
    return out


def relevance_body(event: RelevanceEvent, video_id: str | None, base_url: str) -> dict:
    """Frames and moments; with several media, the event's own video (and its place among the media)."""
    if event.media_index is not None:
        return {"media_index": event.media_index, "video_id": event.video_id,
                "frames": [f.model_dump() for f in event.frames],
                "moments": moments_body(event, event.video_id, base_url)}
    return {"frames": [f.model_dump() for f in event.frames], "moments": moments_body(event, video_id, base_url)}


async def chat_chunks(events: AsyncIterator[AnyEvent], stream: EventStream, *, completion_id: str,
                      created: int, model: str, include_usage: bool, extension: dict,
                      base_url: str, n: int = 1) -> AsyncIterator[dict]:
    """Each of the ``n`` answers' deltas as chunks of its ``index``; an answer's finish chunk goes out
    when it ends, the last one's with the ``llamavid`` usage once the request is done."""
    def chunk(choices: list, **extra: Any) -> dict:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": choices, **extra}
        return {"data": _json(body)}

    def delta(index: int, content: dict, finish_reason: str | None = None, logprobs: list | None = None) -> list:
        return [{"index": index, "delta": content, "finish_reason": finish_reason,
                 "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None}}]

    unannounced = set(range(n))  # answers whose first chunk (with the role) is still to come
    last_finish: tuple[int, str] | None = None  # the last answer's finish waits for the done event

    def role(index: int) -> list[dict]:
        if index not in unannounced:
            return []
        unannounced.discard(index)
        return [chunk(delta(index, {"role": "assistant", "content": ""}))]

    finished = 0
    try:
        async for event in events:
            match event:
                case ProgressEvent():
                    yield chunk([], llamavid={"type": event.type, **extension,
                                              **event.model_dump(exclude={"type"})})
                case RelevanceEvent():
                    yield chunk([], llamavid={"type": event.type, **extension,
                                              **relevance_body(event, extension.get("video_id"), base_url)})
                case DeltaEvent(index=index):
                    for first in role(index):
                        yield first
                    logprobs = [e.model_dump() for e in event.logprobs] if event.logprobs else None
                    if event.text or logprobs:
                        yield chunk(delta(index, {"content": event.text}, logprobs=logprobs))
                    if event.finish_reason is not None:
                        finished += 1
                        if finished < n:
                            yield chunk(delta(index, {}, event.finish_reason))
                        else:
                            last_finish = (index, event.finish_reason)
                case DoneEvent():
                    for index in sorted(unannounced):
                        for first in role(index):
                            yield first
                    index, reason = last_finish or (0, event.finish_reason)
                    used = video_usage(event)
                    yield chunk(delta(index, {}, reason), **({"llamavid": {**extension, **used}} if used else {}))
                    if include_usage:
                        yield chunk([], usage=done_usage(event))
                case ErrorEvent():
                    yield {"data": _json(_error(event))}
        yield {"data": "[DONE]"}
    finally:
        stream.cancel()


async def ask_events(events: AsyncIterator[AnyEvent], stream: EventStream,
                     video_id: str | None, base_url: str) -> AsyncIterator[dict]:
    try:
        async for event in events:
            match event:
                case DoneEvent():
                    data = {"finish_reason": event.finish_reason, "video_id": video_id,
                            "usage": done_usage(event), **video_usage(event)}
                case ErrorEvent():
                    data = _error(event)
                case DeltaEvent(text=text):
                    if not text:
                        continue  # the end of the answer, which the done event reports
                    data = {"text": text}
                case ProgressEvent():
                    data = event.model_dump(exclude={"type"})
                case RelevanceEvent():
                    yield {"event": "relevance", "data": _json({"frames": [f.model_dump() for f in event.frames]})}
                    data = {"video_id": video_id, "moments": moments_body(event, video_id, base_url)}
                    yield {"event": "moments", "data": _json(data)}
                    continue
            yield {"event": event.type, "data": _json(data)}
    finally:
        stream.cancel()
