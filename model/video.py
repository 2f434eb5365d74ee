"""Reading video frames with decord at a target fps (the official sampling rule, spec §6.1).

``step = round(avg_fps / fps)`` and frames ``0, step, 2*step, ...``: about ``fps`` frames per
second, always starting at frame 0. Two additions the official code lacked: a ``max_frames``
cap (evenly thinning the sampled indices, first frame kept) and decoding in chunks, so an hour
of 1080p never sits in host memory at once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


class VideoDecodeError(ValueError):
    """The bytes are not a video decord can read (corrupt, truncated, empty, not a video)."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    avg_fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.num_frames / self.avg_fps if self.avg_fps > 0 else 0.0


@dataclass(frozen=True)
class FrameSampling:
    fps: float = 1.0
    max_frames: int | None = None
    start: float = 0.0  # seconds
    end: float | None = None  # seconds, exclusive

    def as_dict(self) -> dict:
        return {"fps": self.fps, "max_frames": self.max_frames, "start": self.start, "end": self.end}


def sample_indices(info: VideoInfo, sampling: FrameSampling) -> list[int]:
    if sampling.fps <= 0:
        raise ValueError(f"fps must be positive, got {sampling.fps}")
    step = max(1, round(info.avg_fps / sampling.fps))
    first = int(np.ceil(sampling.start * info.avg_fps)) if sampling.start > 0 else 0
    last = info.num_frames if sampling.end is None else min(info.num_frames, int(np.ceil(sampling.end * info.avg_fps)))
    # The official rule counts from frame 0; keep that grid when a start time is given.
    first = -(-first // step) * step
    indices = list(range(first, last, step))
    if sampling.max_frames is not None and len(indices) > sampling.max_frames:
        picks = np.linspace(0, len(indices) - 1, sampling.max_frames).round().astype(int)
        indices = [indices[i] for i in picks]
    return indices


def mp4_trailing_bytes(data: bytes | memoryview) -> int:
    """Bytes after the last top-level box of an ISO-BMFF file (MP4, MOV), 0 if the boxes tile it.

    decord reads an MP4 from its ``moov`` box and ignores whatever follows the boxes, so a valid
    clip with hundreds of megabytes of something else appended would pass as the clip. A box cut
    short (a truncated upload) is not junk: decord decides what it can read of it.
    """
    pos, end = 0, len(data)
    while pos + 8 <= end:
        size, kind = int.from_bytes(data[pos : pos + 4], "big"), bytes(data[pos + 4 : pos + 8])
        if size == 1 and pos + 16 <= end:  # a 64-bit size follows the type
            size = int.from_bytes(data[pos + 8 : pos + 16], "big")
        elif size == 0:  # the last box runs to the end of the file
            return 0
        if size < 8 or not all(32 <= c < 127 for c in kind):
            return end - pos
        pos += size
    return max(0, end - pos)


class VideoFile:
    """A decord reader over a path or in-memory bytes."""

    def __init__(self, source: str | os.PathLike | bytes) -> None:
        import decord

        self._spool = None
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise VideoDecodeError("the video is empty (0 bytes)")
            if bytes(source[4:8]) == b"ftyp" and (junk := mp4_trailing_bytes(source)):
                raise VideoDecodeError(f"the MP4 has {junk} bytes after its last box: a corrupt or padded file")
            # decord's in-memory reader can crash the process on some truncated containers
            # (AVI cut mid-stream) where its file reader fails cleanly: spool bytes to a file.
            self._spool = tempfile.NamedTemporaryFile(prefix="llamavid-video-", suffix=".bin")
            self._spool.write(source)
            self._spool.flush()
            handle = self._spool.name
        else:
            handle = str(source)
        try:
            self._reader = decord.VideoReader(handle, ctx=decord.cpu(0), num_threads=1)
            num_frames = len(self._reader)
            avg_fps = float(self._reader.get_avg_fps())
            height, width = self._reader[0].shape[:2] if num_frames else (0, 0)
        except VideoDecodeError:
            raise
        except Exception as exc:  # decord raises its own DECORDError or RuntimeError
            raise VideoDecodeError(
                f"cannot decode the video: corrupt, truncated or not a video file ({_first_line(exc)})"
            ) from exc
        if num_frames == 0:
            raise VideoDecodeError("the video has no frames")
        if not np.isfinite(avg_fps) or avg_fps <= 0:
            raise VideoDecodeError(f"the video reports an invalid frame rate ({avg_fps})")
        self.info = VideoInfo(num_frames, avg_fps, int(width), int(height))

    def timestamps(self, indices: list[int]) -> list[float]:
        return [i / self.info.avg_fps for i in indices]

    def iter_frames(self, indices: list[int], chunk: int = 32) -> Iterator[np.ndarray]:
        """uint8 RGB frames [t, H, W, 3], ``chunk`` at a time, in index order."""
        for start in range(0, len(indices), chunk):
            part = indices[start : start + chunk]
            try:
                frames = self._reader.get_batch(part).asnumpy()
            except Exception as exc:
                raise VideoDecodeError(f"cannot decode frames {part[0]}..{part[-1]}: {_first_line(exc)}") from exc
            yield frames

    def read(self, indices: list[int]) -> np.ndarray:
        return np.concatenate(list(self.iter_frames(indices)))


def load_video(source: str | os.PathLike | bytes, sampling: FrameSampling = FrameSampling()) -> tuple[np.ndarray, list[float]]:
    """All sampled frames [T, H, W, 3] and their timestamps in seconds (small videos and tests)."""
    video = VideoFile(source)
    indices = sample_indices(video.info, sampling)
    if not indices:
        raise VideoDecodeError("no frames in the requested time range")
    return video.read(indices), video.timestamps(indices)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
