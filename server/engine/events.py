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
    """The video the question is about is still being extracted."""

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


class RelevanceEvent(_Event):
    type: Literal["relevance"] = "relevance"
    frames: list[FrameRelevance]


class DeltaEvent(_Event):
    type: Literal["delta"] = "delta"
    text: str
    offset: int = 0  # characters of the answer before this delta; a relay uses it to detect gaps and resyncs


class DoneEvent(_Event):
    type: Literal["done"] = "done"
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    visual_tokens: int
    completion_tokens: int


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
