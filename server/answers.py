"""From an API request to a ``QuestionJob``, and from its events back to a response.

Shared by ``/v1/chat/completions`` and ``/v1/ask``: one place turns messages and options into
the worker's job (the only place request fields become generation parameters), and one place
decides whether a failure can still be an HTTP status or must travel inside the stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from model.conversation import get_template

from .engine import EngineClient, EventStream
from .errors import APIError
from .jobs import Event, MediaRef, QuestionJob, new_id
from .protocol import SamplingOptions
from .settings import Settings


@dataclass
class Conversation:
    messages: list[dict[str, str]]  # alternating user/assistant, ending with user
    system: str | None = None
    media: MediaRef | None = None
    notes: dict = field(default_factory=dict)


def normalise_turns(turns: list[tuple[str, str]], settings: Settings) -> list[dict[str, str]]:
    """Merge consecutive same-role turns and check what the templates need."""
    merged: list[dict[str, str]] = []
    for role, text in turns:
        if merged and merged[-1]["role"] == role:
            merged[-1]["content"] += "\n" + text
        else:
            merged.append({"role": role, "content": text})
    if not merged or merged[-1]["role"] != "user":
        raise APIError(400, "the last message must come from the user", code="invalid_messages", param="messages")
    if merged[0]["role"] != "user":
        raise APIError(400, "the conversation must start with a user message (after any system message)",
                       code="invalid_messages", param="messages")
    if len(merged) > settings.max_messages:
        raise APIError(400, f"at most {settings.max_messages} messages per conversation", code="too_many_messages",
                       param="messages")
    if not merged[-1]["content"].strip():
        raise APIError(400, "the question is empty", code="empty_question", param="messages")
    total = sum(len(m["content"]) for m in merged)
    if total > settings.max_question_chars:
        raise APIError(400, f"the conversation has {total} characters; the limit is {settings.max_question_chars}",
                       code="question_too_long", param="messages")
    return merged


def build_job(conversation: Conversation, options: SamplingOptions, settings: Settings, *,
              max_tokens: int | None, template: str | None) -> QuestionJob:
    max_tokens = max_tokens or settings.default_max_tokens
    if template is not None:
        try:
            get_template(template)
        except ValueError as exc:
            raise APIError(400, str(exc), code="invalid_template", param="template") from None
    if max_tokens > settings.max_tokens_limit:
        raise APIError(400, f"max_tokens {max_tokens} is above this server's limit of {settings.max_tokens_limit}",
                       code="invalid_max_tokens", param="max_tokens")
    now = time.time()
    return QuestionJob(
        request_id=new_id("req"),
        messages=conversation.messages,
        media=conversation.media.to_dict() if conversation.media else None,
        params={
            "temperature": options.temperature, "top_p": options.top_p, "top_k": options.top_k,
            "max_new_tokens": max_tokens, "stop": options.stop_list(), "seed": options.seed,
        },
        template=template,
        system=conversation.system,
        relevance=options.relevance,
        arrival_time=now,
        deadline=now + settings.request_timeout,
    )


async def first_event(stream: EventStream) -> tuple[Event | None, AsyncIterator[Event]]:
    """Read the first event so an immediate failure can still become an HTTP status."""
    events = stream.__aiter__()
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        return None, events
    if first.type == "error":
        await events.aclose()
        data = first.data
        raise APIError(int(data.get("status", 500)), data.get("message", "error"), code=data.get("code"))
    return first, events


async def chain(first: Event | None, rest: AsyncIterator[Event]) -> AsyncIterator[Event]:
    if first is not None:
        yield first
    async for event in rest:
        yield event


@dataclass
class Collected:
    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    relevance: dict | None = None


async def collect(events: AsyncIterator[Event]) -> Collected:
    out = Collected()
    parts: list[str] = []
    async for event in events:
        if event.type == "delta":
            parts.append(event.data["text"])
        elif event.type == "relevance":
            out.relevance = event.data
        elif event.type == "done":
            out.finish_reason = event.data["finish_reason"]
            out.usage = event.data
        elif event.type == "error":
            data = event.data
            raise APIError(int(data.get("status", 500)), data.get("message", "error"), code=data.get("code"))
    out.text = "".join(parts)
    return out


async def collect_or_abort(events: AsyncIterator[Event], is_disconnected: Callable[[], Awaitable[bool]],
                           poll: float = 0.25) -> Collected:
    """``collect`` for a non-streaming response; a client that hangs up stops the generation
    (the caller cancels the stream) instead of it running to ``max_tokens`` for nobody."""
    task = asyncio.ensure_future(collect(events))
    try:
        while not (await asyncio.wait({task}, timeout=poll))[0]:
            if await is_disconnected():
                raise APIError(499, "the client closed the connection", code="client_closed")
        return task.result()
    finally:
        task.cancel()


async def start(engine: EngineClient, job: QuestionJob) -> tuple[Event | None, AsyncIterator[Event], EventStream]:
    stream = await engine.ask(job)
    try:
        first, rest = await first_event(stream)
    except BaseException:
        stream.cancel()
        raise
    return first, rest, stream
