"""Versioned messages between the API and the GPU worker, and the records they share.

Everything here is plain data with a JSON round trip, because in a split deployment these
cross process boundaries through Redis; the embedded engine passes the same objects in memory.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

JOB_VERSION = 1

MediaKind = Literal["video", "image"]
VideoStatusName = Literal["queued", "extracting", "ready", "failed"]
EventType = Literal["progress", "relevance", "delta", "done", "error"]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class _Json:
    """JSON round trip for flat dataclasses; unknown keys from a newer peer are ignored."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json(cls, text: str | bytes):
        return cls.from_dict(json.loads(text))


@dataclass
class Sampling(_Json):
    """How a video is turned into frames; part of the feature cache's key."""

    fps: float = 1.0
    max_frames: int | None = None
    start: float = 0.0
    end: float | None = None


@dataclass
class MediaRef(_Json):
    """A video or image the worker can find: content digest (media store key) and, for videos, the record."""

    kind: MediaKind
    digest: str
    video_id: str | None = None
    sampling: dict[str, Any] | None = None  # Sampling.to_dict() for videos


@dataclass
class QuestionJob(_Json):
    request_id: str
    messages: list[dict[str, str]]  # [{"role": "user"|"assistant", "content": str}]
    media: dict[str, Any] | None = None  # MediaRef.to_dict()
    params: dict[str, Any] = field(default_factory=dict)  # model.generate.GenerationParams fields
    template: str | None = None
    system: str | None = None
    relevance: bool = False
    arrival_time: float = field(default_factory=time.time)
    deadline: float | None = None  # unix time after which the worker gives up
    version: int = JOB_VERSION

    @property
    def media_ref(self) -> MediaRef | None:
        return MediaRef.from_dict(self.media) if self.media else None


@dataclass
class VideoJob(_Json):
    video_id: str
    digest: str
    sampling: dict[str, Any]
    arrival_time: float = field(default_factory=time.time)
    version: int = JOB_VERSION


@dataclass
class Event(_Json):
    type: EventType
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class VideoRecord(_Json):
    """What ``GET /v1/videos/{id}`` reports; updated by whoever extracts the video."""

    id: str
    digest: str
    sampling: dict[str, Any]
    status: VideoStatusName = "queued"
    frames_done: int = 0
    frames_total: int | None = None
    duration: float | None = None
    source_fps: float | None = None
    fps: float | None = None  # sampling rate actually used
    width: int | None = None
    height: int | None = None
    bytes: int = 0
    filename: str | None = None
    content_type: str | None = None
    timestamps: list[float] | None = None  # seconds of each sampled frame, in order
    error: str | None = None
    error_code: str | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    @property
    def terminal(self) -> bool:
        return self.status in ("ready", "failed")


def error_event(status: int, code: str, message: str) -> Event:
    return Event("error", {"status": status, "code": code, "message": message})
