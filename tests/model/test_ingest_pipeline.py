"""Ingest as a pipeline (issue 13): decoding, preprocessing and encoding overlap across chunks,
the features are the sequential ones bit for bit, skipped frames are reported, and a consumer
that stops early leaves no thread behind."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from model.pipeline import (
    FEATURE_DTYPE,
    INGEST_THREAD_PREFIX,
    encode_video,
    iter_video_features,
    iter_video_pixels,
    plan_video,
)
from model.video import DecodedFrames, FrameSampling, VideoDecodeError, VideoFile
from tests.model.video_media import bar_frame, corrupt_middle
from tests.model.video_media import encode_video as encode_clip
from tests.videos import write_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 s at 10 fps of random frames, so that every frame's features differ."""
    frames = np.random.default_rng(3).integers(0, 256, (40, 48, 80, 3), dtype=np.uint8)
    return write_video(tmp_path_factory.mktemp("ingest") / "clip.mp4", fps=10.0, frames=frames)


def ingest_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(INGEST_THREAD_PREFIX)]


class RecordingVideo:
    """A frame source that records the thread each chunk was decoded on, whether it was closed,
    and optionally fails at one chunk."""

    def __init__(self, video: VideoFile, fail_at: int | None = None) -> None:
        self.video, self.fail_at = video, fail_at
        self.threads: list[str] = []
        self.closed = False

    def iter_frames(self, indices: list[int], chunk: int = 32) -> Iterator[np.ndarray]:
        try:
            for n, frames in enumerate(self.video.iter_frames(indices, chunk=chunk)):
                if n == self.fail_at:
                    raise VideoDecodeError(f"chunk {n} is broken")
                self.threads.append(threading.current_thread().name)
                yield frames
        finally:
            self.closed = True


def test_pipelined_features_are_the_sequential_ones(tiny_model, clip: Path) -> None:
    video, indices = plan_video(clip, FrameSampling(fps=10.0))
    chunks = list(iter_video_features(tiny_model, video, indices, chunk=4))
    assert [c.indices for c in chunks] == [indices[i : i + 4] for i in range(0, 40, 4)]
    sequential = [tiny_model.encode_frames(tiny_model.preprocess(frames)).to(FEATURE_DTYPE)
                  for frames in VideoFile(clip).iter_frames(indices, chunk=4)]
    for got, want in zip(chunks, sequential, strict=True):
        assert torch.equal(got.features, want)
        assert got.skipped == [] and got.encode_seconds > 0
        assert got.decode_seconds > 0 and got.preprocess_seconds > 0
        assert got.wait_seconds >= 0
    encoded = encode_video(tiny_model, VideoFile(clip), indices, chunk=4)
    assert torch.equal(encoded.features, torch.cat(sequential))
    assert ingest_threads() == []


def test_each_stage_runs_in_its_own_thread_from_the_second_chunk(clip: Path) -> None:
    """Chunks 0 and 1 are decoded and preprocessed in the caller's thread (nothing is read ahead
    before the caller comes back for more); from chunk 2 on, decoding and preprocessing each run in
    their own thread, one chunk ahead of the stage after them."""
    source = RecordingVideo(VideoFile(clip))
    preprocessed_on: list[str] = []

    def preprocess(frames: np.ndarray) -> torch.Tensor:
        preprocessed_on.append(threading.current_thread().name)
        return torch.from_numpy(np.asarray(frames)).float()

    caller = threading.current_thread().name
    chunks = list(iter_video_pixels(preprocess, source, list(range(40)), chunk=8))
    assert [len(c.indices) for c in chunks] == [8] * 5
    assert source.threads[:2] == [caller] * 2 and preprocessed_on[:2] == [caller] * 2
    assert all(name.startswith(f"{INGEST_THREAD_PREFIX}-decode") for name in source.threads[2:])
    assert all(name.startswith(f"{INGEST_THREAD_PREFIX}-preprocess") for name in preprocessed_on[2:])
    assert source.closed and ingest_threads() == []


def test_closing_early_stops_the_threads(tiny_model, clip: Path) -> None:
    source = RecordingVideo(VideoFile(clip))
    steps = iter_video_features(tiny_model, source, list(range(40)), chunk=4)
    first, second, third = next(steps), next(steps), next(steps)
    assert [first.indices[0], second.indices[0], third.indices[0]] == [0, 4, 8]
    assert ingest_threads()  # chunks 3 and 4 are in flight
    steps.close()
    assert ingest_threads() == [] and source.closed
    assert len(source.threads) <= 5  # at most two chunks were read ahead of the three consumed
    with pytest.raises(StopIteration):
        next(steps)


def test_an_error_comes_after_the_chunks_before_it(tiny_model, clip: Path) -> None:
    source = RecordingVideo(VideoFile(clip), fail_at=3)
    steps = iter_video_features(tiny_model, source, list(range(40)), chunk=4)
    assert [next(steps).indices[0] for _ in range(3)] == [0, 4, 8]
    with pytest.raises(VideoDecodeError, match="chunk 3 is broken"):
        next(steps)
    assert ingest_threads() == [] and source.closed


def test_skipped_frames_are_reported_per_chunk(tiny_model) -> None:
    data = corrupt_middle(encode_clip([bar_frame(i) for i in range(100)], rate=10, gop=10, b_frames=False))
    video, indices = VideoFile(data), list(range(0, 100, 2))
    chunks = list(iter_video_features(tiny_model, video, indices, chunk=8))
    for c in chunks:
        assert c.features.shape[0] == len(c.indices) and len(c.indices) + len(c.skipped) <= 8
    skipped = [i for c in chunks for i in c.skipped]
    assert skipped and video.frames_skipped == len(skipped)
    assert sorted([i for c in chunks for i in c.indices] + skipped) == indices
    encoded = encode_video(tiny_model, VideoFile(data), indices, chunk=8)
    assert encoded.skipped == skipped
    assert len(encoded.frame_indices) == len(encoded.features) == len(indices) - len(skipped)
    assert encoded.timestamps == pytest.approx([i / 10 for i in encoded.frame_indices])


class NothingDecodes:
    """A frame source whose every frame fails."""

    def iter_frames(self, indices: list[int], chunk: int = 32) -> Iterator[DecodedFrames]:
        for start in range(0, len(indices), chunk):
            part = list(indices[start : start + chunk])
            yield DecodedFrames.of(np.zeros((0, 48, 64, 3), np.uint8), [], part)


def test_nothing_decoded_is_an_error_unless_other_frames_are_cached(tiny_model) -> None:
    steps = iter_video_features(tiny_model, NothingDecodes(), list(range(10)), chunk=4)
    chunks = [next(steps) for _ in range(3)]
    assert [c.skipped for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(c.indices == [] and c.features.shape[0] == 0 for c in chunks)
    with pytest.raises(VideoDecodeError, match="none of the 10 sampled frames"):
        next(steps)
    resumed = list(iter_video_features(tiny_model, NothingDecodes(), list(range(10)), chunk=4,
                                       require_frames=False))
    assert len(resumed) == 3 and ingest_threads() == []
