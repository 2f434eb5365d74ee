"""Request and response schemas of the HTTP API (pydantic; no torch, no FastAPI).

``/v1/chat/completions`` follows OpenAI's schema as vLLM accepts it, with ``video_url`` parts
and a few extension fields (``fps``, ``max_frames``, ``start_time``, ``end_time``,
``frame_selection``, ``subtitles``, ``relevance``, ``top_k``) that the OpenAI client sends through
``extra_body``. Unknown fields are refused rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


def _utf8(text: str) -> str:
    """JSON may carry a lone UTF-16 surrogate (``"\\ud800"``), which no tokenizer can encode: name it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains an unpaired UTF-16 surrogate (\\u{ord(text[exc.start]):04x}) at "
                         f"character {exc.start}; text must be valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]  # every string that reaches a tokenizer or a prompt


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FrameOptions(_Strict):
    """Per-request frame sampling; unset fields use the server's defaults."""

    fps: float | None = Field(None, gt=0, allow_inf_nan=False,
                              description="frames per second to sample (default 1)")
    max_frames: int | None = Field(None, ge=1, description="cap on sampled frames")
    start_time: float | None = Field(None, ge=0, allow_inf_nan=False, description="seconds; sample from here")
    end_time: float | None = Field(None, gt=0, allow_inf_nan=False, description="seconds; sample up to here")

    @model_validator(mode="after")
    def _range(self) -> "FrameOptions":
        if self.start_time is not None and self.end_time is not None and self.end_time <= self.start_time:
            raise ValueError("end_time must be greater than start_time")
        return self


SUBTITLES_HELP = (
    "SRT or WebVTT text, or an http(s) or data: URL of such a file; 'auto': the video's own subtitle "
    "track, else speech-to-text when the server has an ASR model; 'none': frames only. Unset: 'auto' "
    "for long-video checkpoints (they were trained with subtitles), 'none' for the others")


class VideoTextOptions(_Strict):
    """How a question sees a video: its subtitles, and which frames when not all fit the context."""

    subtitles: Text | None = Field(None, description=SUBTITLES_HELP)
    frame_selection: Literal["uniform", "relevant"] = Field(
        "uniform", description="when the frames do not all fit the context: 'uniform' thins them evenly, "
        "'relevant' keeps those the question attends to most (in time order)")


class SamplingOptions(_Strict):
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy (the default)")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="0 disables; default 50 when sampling")
    max_tokens: int | None = Field(None, ge=1)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="a 64-bit integer")
    relevance: bool = Field(False, description="report each sampled frame's relevance to the question and up "
                            "to 5 moments (time spans) where the question's answer is")

    @model_validator(mode="after")
    def _stop(self) -> "SamplingOptions":
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings of up to 256 characters")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


# -- /v1/chat/completions --------------------------------------------------------------------------
class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class URLRef(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. image_url.detail
    url: str = Field(min_length=1)


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: URLRef


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: URLRef


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Text | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(SamplingOptions, FrameOptions, VideoTextOptions):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    presence_penalty: float = Field(0.0, description="not supported; must be 0")
    frequency_penalty: float = Field(0.0, description="not supported; must be 0")
    logprobs: bool = Field(False, description="not supported")
    user: str | None = None
    template: Text | None = None

    @model_validator(mode="after")
    def _checks(self) -> "ChatCompletionRequest":
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by this server; leave it at 0")
        return self


# -- /v1/ask and /v1/videos ------------------------------------------------------------------------
class HistoryTurn(_Strict):
    role: Literal["user", "assistant"]
    content: Text


class AskRequest(SamplingOptions, FrameOptions, VideoTextOptions):
    question: Text = Field(min_length=1)
    video_url: str | None = None
    video_id: str | None = None
    image_url: str | None = None
    history: list[HistoryTurn] = Field(default_factory=list, description="earlier turns, oldest first")
    stream: bool = False
    template: Text | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "AskRequest":
        given = [k for k in ("video_url", "video_id", "image_url") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give at most one of video_url, video_id, image_url (got {', '.join(given)})")
        return self


class VideoFromURL(FrameOptions):
    url: str = Field(min_length=1)
    subtitles: Text | None = Field(None, description="SRT or WebVTT text, or an http(s) or data: URL of one, "
                                   "kept with the video for its questions")


class VideoError(BaseModel):
    code: str
    message: str


class VideoObject(BaseModel):
    id: str
    object: Literal["video"] = "video"
    status: Literal["queued", "extracting", "ready", "failed"]
    frames_done: int
    frames_total: int | None
    progress: float
    duration: float | None
    fps: float | None
    source_fps: float | None
    width: int | None
    height: int | None
    bytes: int
    filename: str | None
    timestamps: list[float] | None = Field(None, description="seconds of each sampled frame")
    frames_skipped: int = Field(0, description="sampled frames that could not be decoded (left out: questions see the others)")
    rotation: int = Field(0, description="degrees the frames were turned to stand upright")
    subtitles: bool = Field(False, description="whether subtitles were uploaded with the video")
    error: VideoError | None
    created_at: int


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def usage(prompt: int, completion: int, visual: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"visual_tokens": visual},
        "visual_tokens": visual,
    }
