"""Request and response schemas of the HTTP API (pydantic; no torch, no FastAPI).

``/v1/chat/completions`` follows OpenAI's schema as vLLM accepts it, with ``video_url`` parts
and a few extension fields (``fps``, ``max_frames``, ``start_time``, ``end_time``,
``frame_selection``, ``subtitles``, ``relevance``, ``top_k``) that the OpenAI client sends through
``extra_body``, and vLLM's ``repetition_penalty`` and ``structured_outputs``. Unknown fields are
refused rather than silently ignored.
"""

from __future__ import annotations

import json
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
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False,
                                    description="subtracted once from the logit of every token already in the answer")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False,
                                     description="subtracted from a token's logit once per time it is in the answer")
    repetition_penalty: float = Field(1.0, gt=0, le=2, allow_inf_nan=False,
                                      description="vLLM's: a logit of a token of the prompt or the answer so far is "
                                      "divided by it when positive, multiplied when negative; 1 = off")
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


MEDIA_UUID_HELP = ("vLLM's media uuid: names the media for later requests, which may send the part with the same "
                   "uuid and no URL (null) to reuse it without resending")


class _MediaPart(_Strict):
    uuid: str | None = Field(None, min_length=1, max_length=256, description=MEDIA_UUID_HELP)

    def ref(self) -> URLRef | None:
        return getattr(self, self.type)

    @model_validator(mode="after")
    def _url_or_uuid(self) -> "_MediaPart":
        if self.ref() is None and self.uuid is None:
            raise ValueError(f"{self.type} needs a url, or a uuid of media sent before")
        return self


class ImagePart(_MediaPart):
    type: Literal["image_url"]
    image_url: URLRef | None = None


class VideoPart(_MediaPart):
    type: Literal["video_url"]
    video_url: URLRef | None = None


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class VideoIOKwargs(_Strict):
    fps: float | None = Field(None, gt=0, allow_inf_nan=False, description="frames per second to sample")
    num_frames: int | None = Field(None, ge=1, description="frames to sample at most (our max_frames)")


class MediaIOKwargs(_Strict):
    """vLLM's per-request ``media_io_kwargs``: only the video loader's frame options mean anything here."""

    video: VideoIOKwargs | None = None


class MMProcessorKwargs(_Strict):
    """vLLM's per-request ``mm_processor_kwargs``, as its video processors read them."""

    fps: float | None = Field(None, gt=0, allow_inf_nan=False, description="frames per second to sample")
    max_frames: int | None = Field(None, ge=1, description="cap on sampled frames")
    num_frames: int | None = Field(None, ge=1, description="frames to sample at most (our max_frames)")


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Text | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's ``response_format``; every answer is decoded under the grammar it implies."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format: give json_schema exactly when type is 'json_schema'")
        return self


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs``: exactly one of its constraints."""

    choice: list[Text] | None = Field(None, min_length=1, max_length=256)
    regex: str | None = Field(None, min_length=1, max_length=4096)
    json_: dict[str, Any] | None = Field(None, alias="json")
    json_object: bool | None = None

    @model_validator(mode="after")
    def _one(self) -> "StructuredOutputs":
        given = [name for name, value in (("choice", self.choice), ("regex", self.regex), ("json", self.json_),
                                          ("json_object", self.json_object)) if value]
        if len(given) != 1:
            raise ValueError("structured_outputs takes exactly one of choice, regex, json, json_object "
                             f"(got {', '.join(given) or 'none'}; grammar and structural_tag are not supported)")
        return self


class ChatCompletionRequest(SamplingOptions, FrameOptions, VideoTextOptions):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=8, description="answers sampled from one prefill of the prompt and frames")
    logprobs: bool = Field(False, description="return each answer token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="and the most likely tokens' at each position")
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    user: str | None = None
    template: Text | None = None
    media_io_kwargs: MediaIOKwargs | None = Field(None, description="vLLM's: video.fps, video.num_frames")
    mm_processor_kwargs: MMProcessorKwargs | None = Field(None, description="vLLM's: fps, max_frames, num_frames")

    @model_validator(mode="after")
    def _checks(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.structured_outputs is not None and self.response_format is not None \
                and self.response_format.type != "text":
            raise ValueError("give response_format or structured_outputs, not both")
        return self

    def grammar(self) -> dict[str, str | None] | None:
        """The constraint on every answer, as the job carries it (``kind``, ``value``)."""
        rf, so = self.response_format, self.structured_outputs
        if rf is not None and rf.type == "json_schema":
            return {"kind": "json_schema", "value": _compact(rf.json_schema.schema_)}
        if rf is not None and rf.type == "json_object":
            return {"kind": "json_object", "value": None}
        if so is None:
            return None
        if so.choice is not None:
            return {"kind": "choice", "value": json.dumps(so.choice)}
        if so.regex is not None:
            return {"kind": "regex", "value": so.regex}
        if so.json_ is not None:
            return {"kind": "json_schema", "value": _compact(so.json_)}
        return {"kind": "json_object", "value": None}


def _compact(schema: dict[str, Any]) -> str:
    """A schema as the job carries it: compact JSON, its keys in the client's order (the answer
    writes properties in the order they are declared)."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


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
