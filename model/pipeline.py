"""Media -> EVA features, shared by the service's worker, ``llamavid ask`` and the demo's evaluation.

Every path encodes through here and stores ``FEATURE_DTYPE``, so the tokens built from features
are the same whether they were just computed or read back from the cache. Videos go one bounded
chunk at a time (decode, preprocess, encode), so host memory stays bounded and a caller can
interleave other work between chunks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image

from .llama_vid import LlamaVid
from .video import FrameSampling, VideoDecodeError, VideoFile, VideoInfo, sample_indices

# What the feature cache stores: every path (service, `llamavid ask`, eval) encodes through it, so a
# first answer sees exactly what a cached one sees.
FEATURE_DTYPE = torch.float16

Progress = Callable[[int, int], None]


@dataclass
class FeatureChunk:
    indices: list[int]  # source frame indices of this chunk, in order
    features: torch.Tensor  # [t, 1+P, C], FEATURE_DTYPE, on the CPU
    decode_seconds: float
    encode_seconds: float


@dataclass
class EncodedVideo:
    features: torch.Tensor  # [T, 1+P, C], FEATURE_DTYPE, on the CPU
    frame_indices: list[int]
    timestamps: list[float]
    info: VideoInfo


def plan_video(source: str | os.PathLike | bytes, sampling: FrameSampling) -> tuple[VideoFile, list[int]]:
    video = VideoFile(source)
    indices = sample_indices(video.info, sampling)
    if not indices:
        raise VideoDecodeError(
            f"no frames to sample: the video is {video.info.duration:.1f}s long and the requested range "
            f"starts at {sampling.start}s"
        )
    return video, indices


def iter_video_features(model: LlamaVid, video: VideoFile, indices: list[int], *, chunk: int = 32) -> Iterator[FeatureChunk]:
    """Decode, preprocess and encode ``chunk`` frames per ``next()``: each step is bounded in time and memory."""
    frames_iter = video.iter_frames(indices, chunk=chunk)
    for start in range(0, len(indices), chunk):
        t0 = time.perf_counter()
        frames = next(frames_iter)
        t1 = time.perf_counter()
        features = _to_cache(model.encode_frames(model.preprocess(frames), batch_size=chunk))
        yield FeatureChunk(indices[start : start + chunk], features, t1 - t0, time.perf_counter() - t1)


def encode_video(
    model: LlamaVid, video: VideoFile, indices: list[int], *, chunk: int = 32, progress: Progress | None = None
) -> EncodedVideo:
    """All of ``indices`` at once; ``progress(done, total)`` is called after every chunk."""
    out, done = [], 0
    for part in iter_video_features(model, video, indices, chunk=chunk):
        out.append(part.features)
        done += len(part.indices)
        if progress is not None:
            progress(done, len(indices))
    return EncodedVideo(torch.cat(out), indices, video.timestamps(indices), video.info)


def encode_image(model: LlamaVid, image: Image.Image, *, pad_to_square: bool | None = None) -> torch.Tensor:
    """One image -> features [1, 1+P, C]; padded to a square as in training unless told otherwise."""
    if pad_to_square is None:
        pad_to_square = model.config.image_aspect_ratio == "pad"
    return _to_cache(model.encode_frames(model.preprocess([image], pad_to_square=pad_to_square)))


def _to_cache(features: torch.Tensor) -> torch.Tensor:
    return features.to("cpu", FEATURE_DTYPE)
