"""The wire messages between API and worker: typed, versioned, and round-tripping through JSON."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from server.engine.events import (
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    FrameRelevance,
    Moment,
    ProgressEvent,
    RelevanceEvent,
    TokenLogprob,
    TopLogprob,
    dump_event,
    load_event,
)
from server.engine.jobs import (
    JOB_VERSION,
    MediaRef,
    QuestionJob,
    Sampling,
    SamplingParams,
    SubtitleRef,
    Turn,
    VideoRecord,
)

EVENTS = [
    ProgressEvent(video_id="vid-1", status="extracting", frames_done=3, frames_total=10),
    RelevanceEvent(frames=[FrameRelevance(index=0, time=0.0, score=1.5, weight=0.7),
                           FrameRelevance(index=1, time=None, score=-2.0, weight=0.3, used=False)],
                   moments=[Moment(start=0.0, end=1.0, score=0.7, frame=0)]),
    DeltaEvent(text="héllo 🦙"),
    DoneEvent(finish_reason="length", prompt_tokens=40, visual_tokens=6, completion_tokens=8, frames_used=1,
              frames_total=2, subtitles="file", subtitle_cues=3),
    ErrorEvent(status=503, code="out_of_memory", message="the GPU ran out of memory"),
]


# an answer of several, with log-probabilities (the encoders' own tests cover them)
ANSWER_DELTA = DeltaEvent(text=" yes", offset=5, index=2, token_offset=3, finish_reason="stop", logprobs=[
    TokenLogprob(token=" yes", logprob=-0.25, bytes=list(b" yes"),
                 top_logprobs=[TopLogprob(token=" no", logprob=-1.5, bytes=list(b" no"))])])


@pytest.mark.parametrize("event", [*EVENTS, ANSWER_DELTA], ids=lambda e: e.type)
def test_every_event_round_trips(event) -> None:
    again = load_event(dump_event(event))
    assert type(again) is type(event) and again == event


def test_a_newer_peers_extra_fields_are_ignored_but_unknown_types_refused() -> None:
    assert load_event('{"type": "delta", "text": "a", "logprob": -0.1}') == DeltaEvent(text="a")
    with pytest.raises(ValidationError):
        load_event('{"type": "thought", "text": "a"}')
    with pytest.raises(ValidationError):
        load_event('{"type": "done", "finish_reason": "tired", "prompt_tokens": 1, "visual_tokens": 0, '
                   '"completion_tokens": 1}')


def test_a_question_job_round_trips_with_its_typed_parts() -> None:
    job = QuestionJob(
        request_id="req-1",
        messages=[Turn(role="user", content="Who?"), Turn(role="assistant", content="A cat."),
                  Turn(role="user", content="And then?")],
        media=MediaRef(kind="video", digest="ab" * 32, video_id="vid-1",
                       sampling=Sampling(fps=2.0, max_frames=64)),
        sampling=SamplingParams(temperature=0.7, max_tokens=32, stop=["\n"], seed=3), relevance=True,
        frame_selection="relevant", subtitles=SubtitleRef(source="file", digest="cd" * 32), deadline=1e10)
    again = QuestionJob.model_validate_json(job.model_dump_json())
    assert again == job and again.version == JOB_VERSION
    assert isinstance(again.media[0].sampling, Sampling) and again.sampling.stop == ["\n"]
    assert isinstance(again.subtitles, SubtitleRef) and again.subtitles.digest == "cd" * 32


def test_the_sampling_dump_is_the_feature_cache_key_layout() -> None:
    """The cache key hashes this dict: its keys and defaults must not drift."""
    assert Sampling().model_dump() == {"fps": 1.0, "max_frames": None, "start": 0.0, "end": None}


def test_a_video_record_survives_its_redis_hash_encoding() -> None:
    record = VideoRecord(id="vid-1", digest="cd" * 32, sampling=Sampling(end=12.5), timestamps=[0.0, 1.0])
    fields = {k: json.dumps(v) for k, v in record.model_dump().items()}  # one JSON value per hash field
    again = VideoRecord.model_validate({k: json.loads(v) for k, v in fields.items()})
    assert again == record and again.sampling.end == 12.5
