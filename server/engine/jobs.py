"""Versioned messages from the API to the GPU worker, and the video records both read.

Pydantic models with a JSON round trip, because in a split deployment these cross process
boundaries through Redis; the embedded engine passes the same objects in memory. Unknown fields
from a newer peer are ignored; ``version`` says which layout a job was written in, and a worker
refuses a job of another version with a clear error rather than misreading it.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

JOB_VERSION = 5  # 5: QuestionJob.media is a list (several videos and images per conversation)

MediaKind = Literal["video", "image"]
VideoStatus = Literal["queued", "extracting", "ready", "failed"]
FrameSelection = Literal["uniform", "relevant"]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Sampling(_Message):
    """How a video is turned into frames. Its ``model_dump()`` is part of the feature cache's key."""

    fps: float = 1.0
    max_frames: int | None = None
    start: float = 0.0
    end: float | None = None


class SubtitleRef(_Message):
    """Which subtitles a video question's frames carry (spec §6.3's interleaving).

    ``file``: an SRT/WebVTT file the client sent, kept in the media store under ``digest``;
    ``auto``: the video's own subtitle track, else a speech-to-text transcript when the worker has
    an ASR model, else none; ``none``: frames only.
    """

    source: Literal["none", "auto", "file"] = "none"
    digest: str | None = None


class MediaRef(_Message):
    """A video or image the worker can find: its content digest (the media store's key) and, for a
    video, the record that reports its extraction and the sampling that names its features."""

    kind: MediaKind
    digest: str
    video_id: str | None = None
    sampling: Sampling | None = None
    turn: int | None = None  # the message it was sent with, when a conversation has several media
    subtitles: SubtitleRef | None = None  # a video's own, when a conversation has several media


class Grammar(_Message):
    """What every answer must match (``model.structured.GrammarSpec``): a JSON schema (as canonical
    JSON text), any JSON object, a regular expression, or one of a list of strings (as JSON)."""

    kind: Literal["json_schema", "json_object", "regex", "choice"]
    value: str | None = None


class SamplingParams(_Message):
    """The request's generation options; ``None`` leaves a field to the checkpoint's defaults."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int = 512
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely
    grammar: Grammar | None = None


class Turn(_Message):
    role: Literal["user", "assistant"]
    content: str


class QuestionJob(_Message):
    request_id: str
    messages: list[Turn]  # alternating, starting and ending with the user
    media: list[MediaRef] = Field(default_factory=list)  # in the order given; one: the official layout
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    template: str | None = None
    system: str | None = None
    relevance: bool = False
    frame_selection: FrameSelection = "uniform"  # how frames are thinned when they do not all fit
    subtitles: SubtitleRef = Field(default_factory=SubtitleRef)
    arrival_time: float = Field(default_factory=time.time)
    deadline: float  # unix time after which the worker gives up; time spent waiting on an extraction
    # that is making progress does not count
    version: int = JOB_VERSION

    @field_validator("media", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        """A single ``MediaRef`` (or None) is a list of one (or none): how one-media callers build jobs."""
        if value is None:
            return []
        return [value] if isinstance(value, (MediaRef, dict)) else value

    @property
    def routing_digest(self) -> str | None:
        """What a split deployment routes the job by: the first video's digest, else the first image's."""
        videos = [m for m in self.media if m.kind == "video"] or self.media
        return videos[0].digest if videos else None


class VideoJob(_Message):
    video_id: str
    digest: str
    sampling: Sampling
    helper: bool = False  # take ranges of an extraction another worker owns (one long video, many workers)
    arrival_time: float = Field(default_factory=time.time)
    version: int = JOB_VERSION


class VideoRecord(_Message):
    """What ``GET /v1/videos/{id}`` reports; updated by whoever extracts the video."""

    id: str
    digest: str
    sampling: Sampling
    status: VideoStatus = "queued"
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
    frames_skipped: int = 0  # sampled frames that could not be decoded (left out: questions see the others)
    rotation: int = 0  # degrees the frames were turned to stand upright (the container's display matrix)
    subtitles: str | None = None  # media-store digest of an SRT/WebVTT file uploaded with the video
    error: str | None = None
    error_code: str | None = None
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)

    @property
    def terminal(self) -> bool:
        return self.status in ("ready", "failed")

    def ref(self) -> MediaRef:
        return MediaRef(kind="video", digest=self.digest, video_id=self.id, sampling=self.sampling)
