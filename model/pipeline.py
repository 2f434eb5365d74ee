"""Media -> EVA features, shared by the CLI and the service's worker.

Frames are decoded, preprocessed and encoded chunk by chunk so host memory stays bounded; a
progress callback sees ``(done, total)`` after every chunk.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError

from .llama_vid import LlamaVid
from .video import FrameSampling, VideoDecodeError, VideoFile, VideoInfo, sample_indices

Progress = Callable[[int, int], None]


class ImageDecodeError(ValueError):
    """The bytes are not an image PIL can read."""


@dataclass
class EncodedVideo:
    features: torch.Tensor  # [T, 1+P, C]
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


def encode_video(
    model: LlamaVid,
    video: VideoFile,
    indices: list[int],
    *,
    chunk: int = 32,
    progress: Progress | None = None,
    on_decoded: Callable[[int, float], None] | None = None,
) -> EncodedVideo:
    """Decode, preprocess and encode ``indices``; ``on_decoded(frames, seconds)`` times the decode."""
    out, done = [], 0
    frames_iter = video.iter_frames(indices, chunk=chunk)
    while True:
        t0 = time.perf_counter()
        frames = next(frames_iter, None)
        if frames is None:
            break
        if on_decoded is not None:
            on_decoded(len(frames), time.perf_counter() - t0)
        out.append(model.encode_frames(model.preprocess(frames), batch_size=chunk).cpu())
        done += len(frames)
        if progress is not None:
            progress(done, len(indices))
    return EncodedVideo(torch.cat(out), indices, video.timestamps(indices), video.info)


def decode_image(data: bytes | str | os.PathLike) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"cannot decode the image: {exc}") from exc
    return image.convert("RGB")


def encode_image(model: LlamaVid, image: Image.Image, *, pad_to_square: bool | None = None) -> torch.Tensor:
    """One image -> features [1, 1+P, C]; padded to a square as in training unless told otherwise."""
    if pad_to_square is None:
        pad_to_square = model.config.image_aspect_ratio == "pad"
    return model.encode_frames(model.preprocess([image], pad_to_square=pad_to_square)).cpu()


def looks_like_image(data: bytes) -> bool:
    head = data[:16]
    return (
        head.startswith(b"\x89PNG")
        or head.startswith(b"\xff\xd8\xff")
        or head[:6] in (b"GIF87a", b"GIF89a")
        or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
        or head.startswith(b"BM")
    )

