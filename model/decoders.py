"""How a video file becomes frames: its frame table, and which library decodes it.

Which library does what was decided by measurement (``bench/ingest.py``: 10-minute 720p H.264,
1 fps, 2 cores; and a corpus of formats checked frame for frame):

* **Index** (frame count, presentation times, keyframes): decord. It reads them from the container
  index in milliseconds, and its ``len()`` / ``get_avg_fps()`` are what the official code samples
  with. Where decord cannot open a file (AV1: its bundled FFmpeg 4.1 has no decoder), PyAV demuxes
  the packets instead.
* **Pixels, 8-bit formats** (nearly every upload): PyAV, one streaming pass with FFmpeg's frame
  threads, seeking only across long gaps, skipping the non-reference frames nobody asked for, and
  finding frames by presentation time. Its RGB is bit-identical to decord's on every 8-bit format
  tried (yuv420p/422p/444p, yuvj*, nv12, gbrp, rgb24; H.264, HEVC, VP9, MPEG-4, MJPEG, FFV1; odd
  sizes), and it samples 1 fps from the 10-minute file about as fast as ``ffmpeg -vf fps=1`` and
  1.6-1.9x faster than decord's ``get_batch`` (decord's own threads made H.264 slower, not faster).
  It also reads what decord gets wrong: MPEG-TS (decord's frames are a GOP off) and widths decord
  mis-strides (48 px). Where PyAV's times do not land on decord's index, decord decodes.
* **Pixels, >8-bit** (10-bit HEVC/HDR): decord, with FFmpeg threads (1.3x on 2 cores). The two
  libraries' 10-bit to RGB conversions differ by up to 150 levels; decord's is the official
  code's, and nearer the source (mean error 1.8 against 3.0 levels).
* **Animated GIF / WebP**: PIL. decord cannot read GIF and FFmpeg cannot decode animated WebP; PIL
  composites both (disposal, partial frames) and gives each frame's duration.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class VideoDecodeError(ValueError):
    """The bytes are not a video we can read (corrupt, truncated, empty, audio only, not a video).

    ``code`` is the machine-readable reason a server reports: ``invalid_video``, or ``audio_only``
    for a file with sound and no pictures (a different fix for the user: send the video itself).
    """

    def __init__(self, message: str, code: str = "invalid_video") -> None:
        super().__init__(message)
        self.code = code


# -- the frame table: how many frames, when each is shown ---------------------------------------


@dataclass
class FrameTable:
    """Presentation start times (seconds, from the first frame), the end of the last frame, the
    container's nominal rate and the keyframes (indices) of a video stream."""

    starts: np.ndarray
    end: float
    nominal_fps: float
    keyframes: np.ndarray

    @property
    def num_frames(self) -> int:
        return len(self.starts)

    def frame_rate(self) -> tuple[float, np.ndarray | None]:
        """``(avg_fps, frame_times)``: the nominal rate and None where every frame sits within half
        a frame of ``i / nominal`` (the index rule then picks the frames the time rule would, so the
        official rule is kept as is), else the measured average rate and the real times."""
        n, nominal = self.num_frames, self.nominal_fps
        times = self.starts - self.starts[0]
        if np.isfinite(nominal) and nominal > 0:
            if np.abs(times - np.arange(n) / nominal).max() < 0.5 / nominal:
                return nominal, None
        span = self.end - self.starts[0]
        if not np.isfinite(span) or span <= 0:
            raise VideoDecodeError(f"the video reports an invalid frame rate ({nominal})")
        return n / span, times


# -- decoders ----------------------------------------------------------------------------------


class _Decoder(Protocol):
    def decode(self, wanted: list[int]) -> dict[int, np.ndarray]:
        """RGB frames [H, W, 3] (coded orientation) for the wanted indices it could decode."""
        ...

    def expect(self, indices: Sequence[int]) -> None:
        """The indices the coming ``decode`` calls will ask for (a decoder may skip the others)."""

    def close(self) -> None: ...


_SEEK_MIN_FRAMES = 64  # seek (flushing the threaded decoder) only to skip at least this many frames
# FFmpeg decoders that apply ``skip_frame`` packet by packet, frame threads included (checked frame
# for frame against full decoding; libdav1d, for one, does not: it lost frames when toggled).
_SKIPS_PER_PACKET = frozenset({"h264", "hevc", "vp9"})


def _decoder_threads() -> int:
    """FFmpeg frame threads: the cores this process may run on (a worker pinned to its GPU's cores
    gets no more threads than those cores), up to 8 (gains flatten beyond, each thread holds frames)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


class _PyavDecoder:
    """Streams through the file in presentation order, with FFmpeg's frame threads.

    Frames are matched to the index by presentation time (not by counting), so a frame the
    decoder drops (a corrupt packet) or a disagreement with decord's numbering can only make a
    frame missing, never a wrong frame. It seeks only backwards or when the next wanted frame lies
    past a keyframe more than ``_SEEK_MIN_FRAMES`` ahead: flushing a frame-threaded decoder costs
    about as much as decoding a few dozen frames, and sampling 1 fps from a GOP of 250 never needs it.
    """

    def __init__(self, path: str, stream_index: int, table: FrameTable, origin: float) -> None:
        import av

        self._container = av.open(path)
        self._stream = self._container.streams[stream_index]
        _use_frame_threads(self._stream)
        self._table, self._origin = table, origin
        self._tb = float(self._stream.time_base)
        self._expected = np.ones(table.num_frames, dtype=bool)
        self._skips = self._stream.codec_context.name in _SKIPS_PER_PACKET
        self._frames = _decoded_frames(self._container, self._stream, self._needed)
        self._held = None  # a decoded frame not consumed yet (past the last target, or peeked after a seek)
        self._seen = -np.inf  # presentation time of the last frame taken from the decoder
        self._last_target = -1  # frames are found in increasing order; an earlier one needs a seek
        self._demuxed_to = -1  # the last frame whose packet went to the decoder (to skip or to decode)
        self._stale = False  # frames now expected went to the decoder as skippable: seek before going on

    def decode(self, wanted: list[int]) -> dict[int, np.ndarray]:
        out = {}
        for target in sorted(wanted):
            frame = self._advance_to(target)
            if frame is not None:
                out[target] = frame.to_ndarray(format="rgb24")
        return out

    def expect(self, indices: Sequence[int]) -> None:
        expected = np.zeros_like(self._expected)
        expected[list(indices)] = True
        in_flight = slice(self._last_target + 1, self._demuxed_to + 1)
        self._stale |= bool((expected[in_flight] & ~self._expected[in_flight]).any())
        self._expected = expected

    def close(self) -> None:
        self._frames = self._held = None
        self._container.close()

    def _needed(self, packet) -> bool:
        """Whether a packet's frame is expected; one that cannot be placed on the index is kept."""
        if not self._skips or packet.pts is None:
            return True
        i = _frame_at(self._table.starts, packet.pts * self._tb - self._origin)
        if i is None:
            return True
        self._demuxed_to = max(self._demuxed_to, i)
        return bool(self._expected[i])

    def _advance_to(self, target: int):
        low, high = _match_window(self._table.starts, target)
        if self._must_seek(target):
            self._seek(target, high)
        self._last_target = target
        while (frame := self._next_frame()) is not None:
            if self._seen < low:
                continue
            if self._seen > high:  # the target never came out of the decoder: it is missing
                self._held = frame
                return None
            return frame
        return None  # end of the stream

    def _next_frame(self):
        frame, self._held = (self._held, None) if self._held is not None else (next(self._frames, None), None)
        if frame is not None:
            self._seen = frame.time - self._origin if frame.time is not None else self._seen
        return frame

    def _must_seek(self, target: int) -> bool:
        if self._stale or target <= self._last_target:
            return True
        position = int(np.searchsorted(self._table.starts, self._seen))
        return self._keyframe(target) - position > _SEEK_MIN_FRAMES

    def _keyframe_index(self, target: int) -> int:
        """Position in ``keyframes`` of the last keyframe at or before ``target`` (-1: none)."""
        return int(np.searchsorted(self._table.keyframes, target, side="right")) - 1

    def _keyframe(self, target: int) -> int:
        return int(self._table.keyframes[max(0, self._keyframe_index(target))])

    def _seek(self, target: int, high: float) -> None:
        """Seek to the keyframe before ``target``; where the container's seek lands past the target
        (MPEG-TS seeks by coarse timestamps and can land a keyframe late) step back a keyframe or
        more, and at worst start over from the beginning."""
        keys, at = self._table.keyframes, self._keyframe_index(target)
        for back in (0, 1, 3, at + 1):
            if at - back >= 0:
                seconds = self._origin + float(self._table.starts[keys[at - back]])
                self._container.seek(int(seconds / self._stream.time_base), stream=self._stream)
            else:
                self._container.seek(0)  # the start of the file, whatever its first timestamp
            self._stream.codec_context.flush_buffers()
            self._frames = _decoded_frames(self._container, self._stream, self._needed)
            self._held, self._seen, self._demuxed_to, self._stale = None, -np.inf, -1, False
            first = self._next_frame()
            self._held = first
            if first is not None and self._seen <= high:
                return


def _frame_at(starts: np.ndarray, t: float) -> int | None:
    """The frame shown at time ``t`` if ``t`` is within its match window, else None."""
    after = int(np.searchsorted(starts, t))
    candidates = [i for i in (after - 1, after) if 0 <= i < len(starts)]
    i = min(candidates, key=lambda c: abs(starts[c] - t))
    low, high = _match_window(starts, i)
    return i if low <= t <= high else None


def _match_window(starts: np.ndarray, i: int) -> tuple[float, float]:
    """Times within which a decoded frame is frame ``i``: up to halfway to its neighbours."""
    left = starts[i] - starts[i - 1] if i > 0 else np.inf
    right = starts[i + 1] - starts[i] if i + 1 < len(starts) else np.inf
    half = 0.5 * min(left, right)
    half = 0.5 if not np.isfinite(half) else half  # a single frame
    return float(starts[i] - half), float(starts[i] + half)


def _use_frame_threads(stream) -> None:
    """Frame + slice threads (must be set before the codec opens): 1.3-1.5x on 2 cores."""
    stream.thread_type, stream.thread_count = "AUTO", _decoder_threads()


def _decoded_frames(container, stream, needed: Callable[[object], bool] | None = None) -> Iterator:
    """Frames in presentation order, leaving out those that cannot be trusted.

    A packet that fails to decode loses its frames, and the frames after it may predict from what
    it lost: FFmpeg conceals that silently (a grey or stale picture, not flagged), so everything up
    to the next keyframe is left out too, as are frames the decoder flags as corrupt.

    Packets ``needed`` says no to are decoded only if other frames reference them (FFmpeg's
    ``skip_frame = NONREF``): sampling 1 fps from 30 fps H.264 with B-frames then decodes a third
    to a half fewer frames (measured: 15-45% less CPU), and every frame that is decoded is exact.
    The setting travels with each packet into FFmpeg's frame threads.
    """
    import av

    tainted, context, skipping = False, stream.codec_context, False
    try:
        for packet in container.demux(stream):
            if needed is not None and (skip := not needed(packet)) != skipping:
                context.skip_frame, skipping = ("NONREF" if skip else "DEFAULT"), skip
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                tainted = True
                continue
            for frame in frames:
                tainted = tainted and not frame.key_frame
                if not (tainted or frame.is_corrupt):
                    yield frame
    except av.error.FFmpegError:  # the container itself is unreadable from here on: end of stream
        return


class _DecordDecoder:
    """decord's batch reader; a batch that fails is split in halves down to the frames that fail."""

    def __init__(self, reader, coded_size: tuple[int, int]) -> None:
        self._reader, self._shape = reader, (*coded_size, 3)

    def decode(self, wanted: list[int]) -> dict[int, np.ndarray]:
        try:
            frames = self._reader.get_batch(wanted).asnumpy()
        except Exception:  # decord raises its own DECORDError or RuntimeError
            if len(wanted) == 1:
                return {}
            mid = len(wanted) // 2
            return {**self.decode(wanted[:mid]), **self.decode(wanted[mid:])}
        if frames.shape[1:] != self._shape:  # decord mis-strides some sizes (e.g. 48 px wide)
            return {}
        return dict(zip(wanted, frames))

    def expect(self, indices: Sequence[int]) -> None:
        pass  # random access: decord decodes only what get_batch asks for

    def close(self) -> None:
        self._reader = None


class _PillowDecoder:
    """Animated GIF / WebP frames, composited by PIL."""

    def __init__(self, image) -> None:
        self._image = image

    def decode(self, wanted: list[int]) -> dict[int, np.ndarray]:
        out = {}
        for i in sorted(wanted):
            try:
                self._image.seek(i)
                out[i] = np.asarray(self._image.convert("RGB"))
            except (OSError, EOFError, ValueError):
                continue
        return out

    def expect(self, indices: Sequence[int]) -> None:
        pass  # GIF and WebP frames build on the previous ones: every frame is decoded anyway

    def close(self) -> None:
        self._image.close()


# -- opening -----------------------------------------------------------------------------------


def _is_animated_image(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return head[:6] in (b"GIF87a", b"GIF89a") or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


# Browsers show a GIF frame of 0 or 10 ms for 100 ms (a common authoring default): so do we.
_IMAGE_FRAME_FLOOR_MS, _IMAGE_FRAME_DEFAULT_MS = 10, 100


@dataclass
class Opened:
    decoder: _Decoder
    table: FrameTable
    rotation: int  # clockwise degrees to show the coded frames upright
    coded_size: tuple[int, int]  # (height, width) of the decoded frames


def _open_animated_image(path: str) -> Opened:
    from PIL import Image

    try:
        image = Image.open(path)
        durations = []
        for i in range(getattr(image, "n_frames", 1)):
            image.seek(i)
            if image.info.get("duration") is None:
                image.load()  # WebP reports a frame's duration once it is decoded
            durations.append(image.info.get("duration"))
    except Exception as exc:  # PIL raises OSError, EOFError, SyntaxError, DecompressionBombError...
        raise VideoDecodeError(f"cannot read the animated image: {_first_line(exc)}") from exc
    ms = [d if d and d > _IMAGE_FRAME_FLOOR_MS else _IMAGE_FRAME_DEFAULT_MS for d in durations]
    seconds = np.array(ms, dtype=np.float64) / 1000
    total = float(seconds.sum())
    starts = np.concatenate([[0.0], np.cumsum(seconds)[:-1]])
    table = FrameTable(starts, total, len(seconds) / total, np.arange(len(seconds)))
    return Opened(_PillowDecoder(image), table, 0, (image.height, image.width))


def _open_container(path: str) -> Opened:
    """Probe with PyAV (video stream, rotation, pixel format), index with decord (PyAV where decord
    cannot open the file), and pick the decoder by the measurements in the module docstring."""
    import av

    try:
        container = av.open(path)
    except Exception as exc:
        raise VideoDecodeError(
            f"cannot decode the video: corrupt, truncated or not a video file ({_first_line(exc)})"
        ) from exc
    with container:
        stream = _video_stream(container)
        first = next(_decoded_frames(container, stream), None)
        if first is None:
            raise VideoDecodeError("cannot decode the video: no frame of it decodes (corrupt or truncated)")
        start = stream.start_time * stream.time_base if stream.start_time is not None else first.time or 0
        index = stream.index
    coded = (first.height, first.width)
    rotation = (-round(first.rotation / 90) * 90) % 360
    reader = _decord_reader(path)
    if reader is None:
        table, origin = _pyav_table(path, index)
        return Opened(_PyavDecoder(path, index, table, origin), table, rotation, coded)
    table, origin = _decord_table(reader), float(start)  # decord's times count from the stream's start
    eight_bit = all(c.bits <= 8 for c in first.format.components)
    if eight_bit and _on_the_index(first, origin, table):
        return Opened(_PyavDecoder(path, index, table, origin), table, rotation, coded)
    return Opened(_DecordDecoder(reader, coded), table, rotation, coded)


def _on_the_index(frame, origin: float, table: FrameTable) -> bool:
    """Whether a frame PyAV decoded lands on a frame of decord's index: PyAV finds frames by time,
    so where the two disagree about times (an exotic container) decord decodes, as it always did."""
    return frame.time is not None and _frame_at(table.starts, frame.time - origin) is not None


def _video_stream(container):
    import av

    stream = container.streams.best("video")
    if stream is None or stream.disposition & av.stream.Disposition.attached_pic:
        if container.streams.audio:
            raise VideoDecodeError("the file holds audio only, no video stream: send the video itself",
                                   code="audio_only")
        raise VideoDecodeError("the file has no video stream (nor any audio)")
    return stream


def _decord_reader(path: str):
    """decord's reader, or None where it cannot open the file (a codec its FFmpeg 4.1 lacks, e.g. AV1)."""
    import decord

    try:
        return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=_decoder_threads())
    except Exception:  # decord raises DECORDError or RuntimeError
        return None


def _decord_table(reader) -> FrameTable:
    """decord's index: read from the container's index, no decoding, the official frame numbering."""
    n = len(reader)
    if n == 0:
        raise VideoDecodeError("the video has no frames")
    times = reader.get_frame_timestamp(list(range(n))).astype(np.float64)
    keys = np.asarray(reader.get_key_indices(), dtype=np.int64)
    return FrameTable(times[:, 0], float(times[-1, 1]), float(reader.get_avg_fps()), keys)


def _pyav_table(path: str, stream_index: int) -> tuple[FrameTable, float]:
    """The frame table and its time origin from the packets, for what decord cannot open.

    Demuxing reads the whole file (no decoding): slower than decord's index, but the only way for
    containers without a full index.
    """
    import av

    rows = []
    with av.open(path) as container:
        stream = container.streams[stream_index]
        try:
            for packet in container.demux(stream):
                if packet.pts is not None:
                    rows.append((packet.pts, packet.duration or 0, packet.is_keyframe))
        except av.error.FFmpegError:
            pass  # a damaged tail: index what came before it
        tb, rate = stream.time_base, stream.average_rate or stream.guessed_rate
    if not rows:
        raise VideoDecodeError("the video has no frames")
    pts, durations, keys = np.array(sorted(rows), dtype=np.int64).T
    starts = (pts - pts[0]) * float(tb)
    guess = starts[-1] - starts[-2] if len(starts) > 1 else 0.0  # a last packet without a duration
    last = durations[-1] * float(tb) if durations[-1] else guess
    table = FrameTable(starts, float(starts[-1] + last), float(rate) if rate else 0.0, np.flatnonzero(keys))
    return table, float(pts[0] * tb)


def open_video(path: str) -> Opened:
    """The decoder, frame table, rotation and coded size for a file: animated images through PIL,
    containers through PyAV and decord."""
    return _open_animated_image(path) if _is_animated_image(path) else _open_container(path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
