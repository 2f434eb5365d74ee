"""From an API request to a ``QuestionJob``, and from its events back to a response.

Shared by ``/v1/chat/completions`` and ``/v1/ask``: ``build_job`` is the only place request
fields become generation parameters, and ``start`` decides whether a failure can still be an
HTTP status (the first event) or must travel inside the stream. A non-streaming answer is
collected while listening for the ASGI ``http.disconnect`` message, so a client that hangs up
cancels its generation before the next decode step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from starlette.requests import Request

from model.conversation import get_template

from ..engine.events import (
    AnyEvent,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    ProgressEvent,
    RelevanceEvent,
    TokenLogprob,
)
from ..engine.jobs import FrameSelection, MediaRef, QuestionJob, SamplingParams, SubtitleRef, Turn, new_id
from ..engine.protocol import EngineClient, EventStream, ModelCard
from ..settings import Settings
from .errors import APIError, from_error_event
from .protocol import SamplingOptions, VideoTextOptions


@dataclass
class Conversation:
    messages: list[Turn]  # alternating user/assistant, ending with user
    system: str | None = None
    media: list[MediaRef] = field(default_factory=list)  # in the order given (several: experimental)
    video_id: str | None = None  # the first video's
    video_ids: list[str | None] = field(default_factory=list)  # per media (None: an image)
    frames: int = 0  # visual inputs the question will carry: sampled frames, 1 for an image
    subtitles: SubtitleRef = field(default_factory=SubtitleRef)
    frame_selection: FrameSelection = "uniform"


def normalise_turns(turns: list[tuple[str, str]], settings: Settings) -> list[Turn]:
    """Merge consecutive same-role turns and check what the templates need."""
    merged: list[dict[str, str]] = []
    for role, text in turns:
        if merged and merged[-1]["role"] == role:
            merged[-1]["content"] += "\n" + text
        else:
            merged.append({"role": role, "content": text})
    if not merged or merged[-1]["role"] != "user":
        raise APIError(400, "the last message must come from the user", code="invalid_messages",
                       param="messages")
    if merged[0]["role"] != "user":
        raise APIError(400, "the conversation must start with a user message (after any system message)",
                       code="invalid_messages", param="messages")
    if len(merged) > settings.max_messages:
        raise APIError(400, f"at most {settings.max_messages} messages per conversation",
                       code="too_many_messages", param="messages")
    if not merged[-1]["content"].strip():
        raise APIError(400, "the question is empty", code="empty_question", param="messages")
    total = sum(len(m["content"]) for m in merged)
    if total > settings.max_question_chars:
        raise APIError(400, f"the conversation has {total} characters; the limit is "
                            f"{settings.max_question_chars}",
                       code="question_too_long", param="messages")
    return [Turn.model_validate(m) for m in merged]


def check_context(conversation: Conversation, card: ModelCard) -> None:
    """Refuse up front a question that cannot fit at all: the text with one frame (a video's frames
    are thinned to fit by the worker, which counts tokens exactly) or with the image.

    The text is estimated at 4 characters a token, which over-counts English: a question refused
    here would not fit the worker's exact count either."""
    visual = min(conversation.frames, len(conversation.media)) * card.tokens_per_frame
    text = sum(len(m.content) for m in conversation.messages) // 4
    room = min(card.context_length, card.kv_positions)
    if visual + text >= room:
        where = (f"the model's context of {card.context_length} tokens" if room == card.context_length
                 else f"this server's KV cache of {card.kv_positions} positions")
        raise APIError(400, f"the conversation (about {text} tokens) and {visual} visual tokens do not fit "
                            f"{where}; shorten the conversation", code="context_length_exceeded")


def no_video_fields(req: VideoTextOptions) -> None:
    """Subtitles and frame selection are about a video's frames: refuse them on other questions."""
    subtitles_set = req.subtitles is not None and req.subtitles.strip().lower() != "none"
    for name, given in (("subtitles", subtitles_set), ("frame_selection", req.frame_selection != "uniform")):
        if given:
            raise APIError(400, f"{name} applies to a question about a video, and this one has none",
                           code="invalid_request", param=name)


def build_job(conversation: Conversation, options: SamplingOptions, settings: Settings, *,
              max_tokens: int | None, template: str | None, answers: dict | None = None) -> QuestionJob:
    """``answers``: the chat-only fields (``n``, ``logprobs``, ``grammar``) as ``SamplingParams`` takes them."""
    answers = answers or {}
    max_tokens = max_tokens or min(settings.default_max_tokens, settings.max_tokens_limit)
    if template is not None:
        try:
            get_template(template)
        except ValueError as exc:
            raise APIError(400, str(exc), code="invalid_template", param="template") from None
    if max_tokens > settings.max_tokens_limit:
        raise APIError(400, f"max_tokens {max_tokens} is above this server's limit of "
                            f"{settings.max_tokens_limit}",
                       code="invalid_max_tokens", param="max_tokens")
    now = time.time()
    return QuestionJob(
        request_id=new_id("req"),
        messages=conversation.messages,
        media=conversation.media,
        sampling=SamplingParams(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k,
                                max_tokens=max_tokens, stop=options.stop_list(), seed=options.seed,
                                presence_penalty=options.presence_penalty,
                                frequency_penalty=options.frequency_penalty,
                                repetition_penalty=options.repetition_penalty, **answers),
        template=template,
        system=conversation.system,
        relevance=options.relevance,
        frame_selection=conversation.frame_selection,
        subtitles=conversation.subtitles,
        arrival_time=now,
        deadline=now + settings.request_timeout,
    )


Gone = Callable[[], Awaitable[None]]  # returns when whoever waits for the answer has left


async def start(engine: EngineClient, job: QuestionJob,
                gone: Gone) -> tuple[AsyncIterator[AnyEvent], EventStream]:
    """Admit the job and read its first event, so that an immediate failure is still an HTTP status.

    The first event can take long (an extraction to wait for, a long prefill, text held back by
    the detokenizer), so the client's disconnect is watched from here on too.
    """
    stream = await engine.ask(job)
    events = stream.__aiter__()
    reading = asyncio.ensure_future(anext(events, None))
    leaving = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({reading, leaving}, return_when=asyncio.FIRST_COMPLETED)
        if not reading.done():
            raise APIError(499, "the client closed the connection", code="client_closed")
        first = reading.result()
    except BaseException:
        stream.cancel()
        raise
    finally:
        reading.cancel()
        leaving.cancel()
    if isinstance(first, ErrorEvent):
        stream.cancel()
        raise from_error_event(first)
    return _chain(first, events), stream


async def _chain(first: AnyEvent | None, rest: AsyncIterator[AnyEvent]) -> AsyncIterator[AnyEvent]:
    if first is not None:
        yield first
    async for event in rest:
        yield event


@dataclass
class CollectedAnswer:
    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass
class Collected:
    answers: dict[int, CollectedAnswer] = field(default_factory=dict)  # by index, of the request's n
    done: DoneEvent | None = None
    relevance: RelevanceEvent | None = None
    relevances: list[RelevanceEvent] = field(default_factory=list)  # one per video (several media)
    progress: list[ProgressEvent] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.answers[0].text if 0 in self.answers else ""


async def _collect(events: AsyncIterator[AnyEvent]) -> Collected:
    out = Collected()
    async for event in events:
        match event:
            case DeltaEvent():
                answer = out.answers.setdefault(event.index, CollectedAnswer())
                answer.parts.append(event.text)
                if event.logprobs is not None:
                    answer.logprobs = (answer.logprobs or []) + event.logprobs
                answer.finish_reason = event.finish_reason or answer.finish_reason
            case RelevanceEvent():
                out.relevance = event
                out.relevances.append(event)
            case ProgressEvent():
                out.progress.append(event)
            case DoneEvent():
                out.done = event
            case ErrorEvent():
                raise from_error_event(event)
    return out


def client_gone(request: Request) -> Gone:
    """Returns when the ASGI server reports that the client closed the connection."""
    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    return wait


async def collect(events: AsyncIterator[AnyEvent], stream: EventStream, gone: Gone) -> Collected:
    """A whole non-streaming answer; the client's disconnect cancels the stream at once."""
    collecting = asyncio.ensure_future(_collect(events))
    leaving = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({collecting, leaving}, return_when=asyncio.FIRST_COMPLETED)
        if collecting.done():
            return collecting.result()
        raise APIError(499, "the client closed the connection", code="client_closed")
    finally:
        stream.cancel()
        collecting.cancel()
        leaving.cancel()
