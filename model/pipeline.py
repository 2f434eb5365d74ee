"""Media -> EVA features, shared by the service's worker, ``llamavid ask`` and the demo's evaluation.

Every path encodes through here and stores ``FEATURE_DTYPE``, so the tokens built from features
are the same whether they were just computed or read back from the cache. Videos go one bounded
chunk at a time, so host memory stays bounded and a caller can interleave other work between
chunks. Ingest is a pipeline: while chunk i is encoded, chunk i+1 is preprocessed and chunk i+2
decoded, in two background threads (``iter_video_features``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from .llama_vid import LlamaVid
from .video import FrameSampling, VideoDecodeError, VideoFile, VideoInfo, sample_indices

# What the feature cache stores: every path (service, `llamavid ask`, eval) encodes through it, so a
# first answer sees exactly what a cached one sees.
FEATURE_DTYPE = torch.float16

# Names the read-ahead threads, so that a test (or an operator) can see none outlives its video.
INGEST_THREAD_PREFIX = "llamavid-ingest"

Progress = Callable[[int, int], None]
T = TypeVar("T")


@dataclass
class FeatureChunk:
    indices: list[int]  # source frame indices of this chunk that decoded, in order (one per feature row)
    features: torch.Tensor  # [t, 1+P, C], FEATURE_DTYPE, on the CPU; t is 0 when nothing in the chunk decoded
    decode_seconds: float  # in the decode thread, overlapped with earlier chunks' preprocessing and encoding
    encode_seconds: float  # the EVA forward pass alone (preprocessing is preprocess_seconds)
    skipped: list[int] = field(default_factory=list)  # the chunk's requested indices that did not decode
    preprocess_seconds: float = 0.0  # in the preprocess thread, overlapped like decoding
    wait_seconds: float = 0.0  # how long this step waited for its pixels: what the overlap did not hide


@dataclass
class EncodedVideo:
    features: torch.Tensor  # [T, 1+P, C], FEATURE_DTYPE, on the CPU
    frame_indices: list[int]  # the frames that decoded
    timestamps: list[float]
    info: VideoInfo
    skipped: list[int] = field(default_factory=list)  # sampled frames that could not be decoded


def plan_video(source: str | os.PathLike | bytes, sampling: FrameSampling) -> tuple[VideoFile, list[int]]:
    video = VideoFile(source)
    indices = sample_indices(video.info, sampling)
    if not indices:
        video.close()
        raise VideoDecodeError(
            f"no frames to sample: the video is {video.info.duration:.1f}s long and the requested range "
            f"starts at {sampling.start}s"
        )
    return video, indices


def iter_video_features(
    model: LlamaVid, video: VideoFile, indices: list[int], *, chunk: int = 32, require_frames: bool = True
) -> Iterator[FeatureChunk]:
    """Decode, preprocess and encode ``chunk`` frames per ``next()``, in order.

    A three-stage pipeline, each stage one chunk at a time: while chunk i is encoded (in the
    caller's thread), chunk i+1 is preprocessed and chunk i+2 decoded, each in its own thread
    (``iter_video_pixels``). A step stays bounded (one encode, at most one decode and one
    preprocess started) and at most three chunks are in memory. Frames that cannot be decoded are
    left out and listed in the chunk's ``skipped``; a chunk can come out empty (store nothing for
    it). After the last chunk a ``VideoDecodeError`` is raised if none of ``indices`` decoded,
    unless ``require_frames`` is False (a resumed extraction whose other frames are cached
    already). Closing the generator early waits for the chunks in flight and stops the threads.
    """
    pixels = iter_video_pixels(model.preprocess, video, indices, chunk=chunk)
    decoded = 0
    try:
        while True:
            t0 = time.perf_counter()
            part = next(pixels, None)
            if part is None:
                break
            t1 = time.perf_counter()
            features = _to_cache(model.encode_frames(part.data, batch_size=chunk))
            decoded += len(part.indices)
            yield FeatureChunk(part.indices, features, part.decode_seconds, time.perf_counter() - t1,
                               part.skipped, part.preprocess_seconds, t1 - t0)
    finally:
        pixels.close()
    if require_frames and indices and not decoded:
        raise VideoDecodeError(f"none of the {len(indices)} sampled frames could be decoded")


@dataclass
class PixelChunk:
    """A chunk between stages: decoded frames, then preprocessed pixels, and which frames they are."""

    indices: list[int]  # the requested indices that decoded, one per row of ``data``
    skipped: list[int]  # the requested indices that could not be decoded
    data: Any  # uint8 frames [t, H, W, 3] after decoding, float pixels [t, 3, S, S] after preprocessing
    decode_seconds: float
    preprocess_seconds: float = 0.0


def iter_video_pixels(
    preprocess: Callable[[np.ndarray], torch.Tensor], video: VideoFile, indices: list[int], *, chunk: int = 32
) -> Generator[PixelChunk, None, None]:
    """The first two stages of ``iter_video_features``: chunks of preprocessed pixels, in order.

    From the second chunk on, decoding runs one chunk ahead in one thread and preprocessing in
    another, so they overlap each other and whatever the caller does with the previous chunk.
    """
    decoded = _read_ahead(_decoded_chunks(video, indices, chunk), "decode")
    return _read_ahead(_preprocessed(preprocess, decoded), "preprocess")


def _decoded_chunks(video: VideoFile, indices: list[int], chunk: int) -> Generator[PixelChunk, None, None]:
    """The decode stage: frames, with the requested indices they are (``DecodedFrames.indices``)."""
    frames_iter = video.iter_frames(indices, chunk=chunk)
    try:
        for start in range(0, len(indices), chunk):
            part = indices[start : start + chunk]
            t0 = time.perf_counter()
            frames = next(frames_iter)
            decoded = getattr(frames, "indices", None)  # a plain frame source decodes every index
            decoded = part if decoded is None else list(decoded)
            kept = set(decoded)
            yield PixelChunk(decoded, [i for i in part if i not in kept], frames, time.perf_counter() - t0)
    finally:
        frames_iter.close()


def _preprocessed(
    preprocess: Callable[[np.ndarray], torch.Tensor], chunks: Generator[PixelChunk, None, None]
) -> Generator[PixelChunk, None, None]:
    """The preprocess stage: CLIP pixels in place of the frames."""
    try:
        for part in chunks:
            t0 = time.perf_counter()
            pixels = preprocess(part.data)
            yield replace(part, data=pixels, preprocess_seconds=time.perf_counter() - t0)
    finally:
        chunks.close()


_END = object()


def _read_ahead(items: Generator[T, None, None], stage: str) -> Generator[T, None, None]:
    """``items`` in order, the next one computed in a thread while the consumer works on this one.

    The read-ahead starts when the consumer comes back for a second item (items 0 and 1 are
    computed in the caller's thread): the first chunk's features reach the caller (the progress
    bar, the first cache write) without other work competing for the cores, and a caller that
    stops after one chunk pays for nothing more. Closing the generator waits for the item in
    flight (a generator cannot be closed while it runs in another thread), then closes ``items``
    and the thread.
    """
    pool = ThreadPoolExecutor(1, thread_name_prefix=f"{INGEST_THREAD_PREFIX}-{stage}")
    pending: Future | None = None
    try:
        item = next(items, _END)
        while item is not _END:
            yield item
            item = pending.result() if pending is not None else next(items, _END)
            pending = pool.submit(next, items, _END) if item is not _END else None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        items.close()


def encode_video(
    model: LlamaVid, video: VideoFile, indices: list[int], *, chunk: int = 32, progress: Progress | None = None
) -> EncodedVideo:
    """All of ``indices`` at once; ``progress(done, total)`` is called after every chunk."""
    out, decoded, skipped = [], [], []
    for part in iter_video_features(model, video, indices, chunk=chunk):
        out.append(part.features)
        decoded += part.indices
        skipped += part.skipped
        if progress is not None:
            progress(len(decoded) + len(skipped), len(indices))
    return EncodedVideo(torch.cat(out), decoded, video.timestamps(decoded), video.info, skipped)


def encode_image(model: LlamaVid, image: Image.Image, *, pad_to_square: bool | None = None) -> torch.Tensor:
    """One image -> features [1, 1+P, C]; padded to a square as in training unless told otherwise."""
    if pad_to_square is None:
        pad_to_square = model.config.image_aspect_ratio == "pad"
    return _to_cache(model.encode_frames(model.preprocess([image], pad_to_square=pad_to_square)))


def _to_cache(features: torch.Tensor) -> torch.Tensor:
    return features.to("cpu", FEATURE_DTYPE)
