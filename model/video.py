"""Reading video frames at a target fps (the official sampling rule, spec §6.1), robustly.

Sampling. ``step = round(avg_fps / fps)`` and frames ``0, step, 2*step, ...``: about ``fps``
frames per second, always starting at frame 0. That rule is kept exactly for constant-frame-rate
video (parity with the official code). Additions the official code lacked: a ``max_frames`` cap
(evenly thinning the sampled indices, first frame kept), decoding in chunks (an hour of 1080p
never sits in host memory at once), and presentation-time sampling for variable-frame-rate
streams, where ``index / avg_fps`` is not the time a frame is shown: there the sampled frames are
the ones shown nearest to the times the official rule would pick at the average rate.

Robustness. Rotation metadata is honoured (frames come out upright; ``VideoInfo`` has the
displayed size); animated GIF and WebP are videos with their own frame timing; frames that cannot
be decoded are skipped and reported (a corrupt stretch does not fail the whole file); a file with
no video stream, or nothing decodable, is a clear ``VideoDecodeError``.

Which decoder reads what, and why, is in ``model.decoders``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .decoders import VideoDecodeError, open_video

__all__ = [
    "DecodedFrames", "FrameSampling", "VideoDecodeError", "VideoFile", "VideoInfo", "load_video",
    "mp4_trailing_bytes", "nearest_frames", "sample_indices",
]


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    avg_fps: float
    width: int  # as displayed: the coded size with the rotation applied
    height: int
    rotation: int = 0  # degrees clockwise (0, 90, 180, 270) the coded frames are turned to show them upright
    # Presentation time of each frame in seconds from the first, only for variable-frame-rate
    # streams; None means frame i is shown at i / avg_fps (the official rule's assumption holds).
    frame_times: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def duration(self) -> float:
        return self.num_frames / self.avg_fps if self.avg_fps > 0 else 0.0

    @property
    def variable_frame_rate(self) -> bool:
        return self.frame_times is not None

    def times(self, indices: Sequence[int]) -> list[float]:
        """Presentation times in seconds (``i / avg_fps`` at a constant frame rate, as the official code)."""
        if self.frame_times is None:
            return [i / self.avg_fps for i in indices]
        return [float(self.frame_times[i]) for i in indices]


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
    if info.frame_times is not None:
        # Variable frame rate: the grid gives the times the official rule means at the average
        # rate; the frames shown nearest to those times are the ones to take.
        indices = list(dict.fromkeys(nearest_frames(info.frame_times, [i / info.avg_fps for i in indices])))
    if sampling.max_frames is not None and len(indices) > sampling.max_frames:
        picks = np.linspace(0, len(indices) - 1, sampling.max_frames).round().astype(int)
        indices = [indices[i] for i in picks]
    return indices


def nearest_frames(frame_times: np.ndarray, times: Sequence[float]) -> list[int]:
    """For each time, the frame whose presentation time is nearest (the earlier one on a tie)."""
    if len(times) == 0:
        return []
    t = np.asarray(times, dtype=np.float64)
    after = np.clip(np.searchsorted(frame_times, t), 0, len(frame_times) - 1)
    before = np.clip(after - 1, 0, len(frame_times) - 1)
    take_after = np.abs(frame_times[after] - t) < np.abs(t - frame_times[before])
    return np.where(take_after, after, before).tolist()


def mp4_trailing_bytes(data: bytes | memoryview) -> int:
    """Bytes after the last top-level box of an ISO-BMFF file (MP4, MOV), 0 if the boxes tile it.

    decord reads an MP4 from its ``moov`` box and ignores whatever follows the boxes, so a valid
    clip with hundreds of megabytes of something else appended would pass as the clip. A box cut
    short (a truncated upload) is not junk: the decoders decide what they can read of it.
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


class DecodedFrames(np.ndarray):
    """uint8 RGB frames [t, H, W, 3], upright, that also say which requested frames they are.

    ``VideoFile.iter_frames`` yields one per chunk of requested indices. It is an ndarray, so a
    caller that only wants pixels (thumbnails, tests) uses it as it always did; ``indices`` (the
    requested indices that decoded, one per row, in request order) and ``skipped`` (those that
    could not be decoded) are for a caller that stores per-frame results. Only the yielded array
    carries the two lists: on a slice or copy, which row is which frame is unknown, so they are None.
    """

    indices: list[int] | None
    skipped: list[int] | None

    @classmethod
    def of(cls, frames: np.ndarray, indices: list[int], skipped: list[int]) -> DecodedFrames:
        out = frames.view(cls)
        out.indices, out.skipped = indices, skipped
        return out

    def __array_finalize__(self, obj: object) -> None:
        self.indices = self.skipped = None


class VideoFile:
    """Frames of a video (a path or in-memory bytes): upright, by index, undecodable ones skipped.

    ``info`` describes the video; ``iter_frames`` decodes; ``timestamps`` gives presentation
    times; ``frames_skipped`` counts the requested frames that could not be decoded so far. Not
    thread-safe: use one reader from one thread at a time (the pipeline's read-ahead does).
    """

    def __init__(self, source: str | os.PathLike | bytes) -> None:
        self._spool = None
        self._skipped: set[int] = set()
        path = self._local_path(source)
        try:
            opened = open_video(path)
            avg_fps, frame_times = opened.table.frame_rate()
        except BaseException:
            self._close_spool()
            raise
        self._decoder, self._rotation = opened.decoder, opened.rotation
        height, width = opened.coded_size if opened.rotation in (0, 180) else opened.coded_size[::-1]
        self.info = VideoInfo(opened.table.num_frames, avg_fps, width, height, opened.rotation, frame_times)

    def _local_path(self, source: str | os.PathLike | bytes) -> str:
        """A file every decoder can open: bytes are spooled to a temporary file.

        decord's in-memory reader can crash the process on some truncated containers (AVI cut
        mid-stream) where its file reader fails cleanly, and PIL/PyAV read files as well.
        """
        if not isinstance(source, (bytes, bytearray, memoryview)):
            return str(source)
        if len(source) == 0:
            raise VideoDecodeError("the video is empty (0 bytes)")
        if bytes(source[4:8]) == b"ftyp" and (junk := mp4_trailing_bytes(source)):
            raise VideoDecodeError(f"the MP4 has {junk} bytes after its last box: a corrupt or padded file")
        self._spool = tempfile.NamedTemporaryFile(prefix="llamavid-video-", suffix=".bin")
        self._spool.write(source)
        self._spool.flush()
        return self._spool.name

    @property
    def frames_skipped(self) -> int:
        """How many distinct requested frames could not be decoded, over this reader's life."""
        return len(self._skipped)

    def timestamps(self, indices: Sequence[int]) -> list[float]:
        return self.info.times(indices)

    def indices_at(self, times: Sequence[float]) -> list[int]:
        """The frames shown nearest to the given times (seconds), e.g. to show a sampled moment."""
        if self.info.frame_times is not None:
            return nearest_frames(self.info.frame_times, times)
        last = self.info.num_frames - 1
        return [min(last, max(0, round(t * self.info.avg_fps))) for t in times]

    def iter_frames(self, indices: Sequence[int], chunk: int = 32) -> Iterator[DecodedFrames]:
        """One ``DecodedFrames`` per ``chunk`` requested indices, in request order.

        Frames that cannot be decoded are left out of their chunk (which can come out empty) and
        listed in its ``skipped``; nothing here raises for them.
        """
        self._decoder.expect(indices)
        for start in range(0, len(indices), chunk):
            yield self._decode(list(indices[start : start + chunk]))

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """The frames of ``indices`` that decode, stacked; a VideoDecodeError if none does."""
        return _require_frames(list(self.iter_frames(indices)), len(indices))[0]

    def close(self) -> None:
        self._decoder.close()
        self._close_spool()

    def __enter__(self) -> VideoFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _decode(self, wanted: list[int]) -> DecodedFrames:
        found = self._decoder.decode(list(dict.fromkeys(wanted)))
        decoded = [i for i in wanted if i in found]
        skipped = [i for i in wanted if i not in found]
        self._skipped.update(skipped)
        if decoded:
            frames = np.stack([_upright(found[i], self._rotation) for i in decoded])
        else:
            frames = np.empty((0, self.info.height, self.info.width, 3), np.uint8)
        return DecodedFrames.of(frames, decoded, skipped)

    def _close_spool(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None


def load_video(source: str | os.PathLike | bytes, sampling: FrameSampling = FrameSampling()) -> tuple[np.ndarray, list[float]]:
    """The sampled frames that decode [T, H, W, 3] and their timestamps in seconds (small videos, tests)."""
    with VideoFile(source) as video:
        indices = sample_indices(video.info, sampling)
        if not indices:
            raise VideoDecodeError("no frames in the requested time range")
        frames, decoded = _require_frames(list(video.iter_frames(indices)), len(indices))
        return frames, video.timestamps(decoded)


def _require_frames(chunks: list[DecodedFrames], requested: int) -> tuple[np.ndarray, list[int]]:
    decoded = [i for c in chunks for i in c.indices]
    if not decoded:
        raise VideoDecodeError(f"none of the {requested} requested frames could be decoded")
    return np.concatenate([np.asarray(c) for c in chunks]), decoded


def _upright(frame: np.ndarray, rotation: int) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(frame, k=-rotation // 90)) if rotation else frame
