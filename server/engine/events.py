"""What an answer is made of on its way from the worker to the client: a tagged union of events.

Every consumer (the chat and ask encoders, the non-streaming collector, the Redis relay) matches
on the type, so a new kind of event cannot be silently dropped by one of them. A question's
events end with exactly one ``DoneEvent`` or ``ErrorEvent``, unless the client went away first.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class ProgressEvent(_Event):
    """The video the question is about is still being extracted (``status`` "queued" or
    "extracting", counting frames) or transcribed ("transcribing", counting seconds of audio)."""

    type: Literal["progress"] = "progress"
    video_id: str
    status: str
    frames_done: int
    frames_total: int | None = None
    error: str | None = None


class FrameRelevance(_Event):
    index: int
    time: float | None
    score: float  # the context attention's log-sum-exp logit, averaged over queries
    weight: float  # softmax of the scores over the sampled frames
    used: bool = True  # whether the frame is among those the LLM saw (see DoneEvent.frames_used)


class Moment(_Event):
    """A span of neighbouring relevant frames (``model.relevance.moments``)."""

    start: float  # seconds
    end: float
    score: float  # share of the question's attention inside the span
    frame: int  # index of the span's most relevant sampled frame (its thumbnail)


class RelevanceEvent(_Event):
    """Per-frame relevance of one video; a question about several has one event per video, named by
    ``media_index`` (its place among the conversation's media) and ``video_id``."""

    type: Literal["relevance"] = "relevance"
    frames: list[FrameRelevance]
    moments: list[Moment] = []
    media_index: int | None = None
    video_id: str | None = None


class MediaUsage(_Event):
    """What the answer used of one of a conversation's several media (``DoneEvent.media``)."""

    index: int
    kind: Literal["video", "image"]
    video_id: str | None = None
    frames_used: int
    frames_total: int


class TopLogprob(_Event):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(_Event):
    """OpenAI's ``ChatCompletionTokenLogprob``: a generated token and, when asked for, the most likely
    tokens at its position. Log-probabilities are the model's own, before penalties or a grammar."""

    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob] = []


class DeltaEvent(_Event):
    """New text of answer ``index`` (of the request's ``n``); the last one of each answer carries its
    ``finish_reason``. ``logprobs`` covers the tokens generated since the answer's previous delta."""

    type: Literal["delta"] = "delta"
    text: str
    offset: int = 0  # characters of the answer before this delta; a relay uses it to detect gaps and resyncs
    index: int = 0
    logprobs: list[TokenLogprob] | None = None
    token_offset: int = 0  # tokens of the answer before this delta's logprobs (the relay's resync)
    finish_reason: Literal["stop", "length"] | None = None


class DoneEvent(_Event):
    """The end of every answer; ``finish_reason`` is answer 0's, ``completion_tokens`` counts all."""

    type: Literal["done"] = "done"
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    visual_tokens: int
    completion_tokens: int
    frames_used: int | None = None  # frames the LLM saw, after thinning to fit its context
    frames_total: int | None = None  # frames sampled and cached for the video
    subtitles: str | None = None  # where the frames' subtitles came from: file, container, asr
    subtitle_cues: int = 0
    media: list[MediaUsage] = []  # per media, when the conversation has several (frames counts sum them)


class ErrorEvent(_Event):
    """A failure after the request was admitted; ``status`` is the HTTP status it would have had."""

    type: Literal["error"] = "error"
    status: int
    code: str
    message: str


Event = Annotated[ProgressEvent | RelevanceEvent | DeltaEvent | DoneEvent | ErrorEvent,
                  Field(discriminator="type")]
AnyEvent = ProgressEvent | RelevanceEvent | DeltaEvent | DoneEvent | ErrorEvent
FINAL = (DoneEvent, ErrorEvent)

_EVENT = TypeAdapter(Event)


def load_event(raw: str | bytes) -> AnyEvent:
    return _EVENT.validate_json(raw)


def dump_event(event: AnyEvent) -> str:
    return event.model_dump_json()
