"""Test media made here with PyAV and PIL: phone clips with rotation metadata, animated GIF/WebP,
variable frame rate, a corrupt middle, MPEG-TS, 10-bit (an audio-only file: ``tests.model.media``).

Frames spell their index with the bars of ``tests.model.test_video`` (``bar_frame`` makes one,
``frame_index`` reads it back), so a test can tell exactly which frames came back.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np
from PIL import Image

from tests.model.test_video import _frame as bar_frame
from tests.model.test_video import frame_index

__all__ = ["animated_image", "bar_frame", "corrupt_middle", "encode_video", "frame_index"]

_MS = Fraction(1, 1000)


def encode_video(frames: Sequence[np.ndarray], *, rate: int = 10, times: Sequence[float] | None = None,
                 rotation: int = 0, fmt: str = "mp4", gop: int | None = None, b_frames: bool = True,
                 pix_fmt: str = "yuv420p") -> bytes:
    """H.264 of the RGB ``frames``: at ``rate`` fps, or shown at ``times`` (seconds, a variable
    frame rate); ``rotation`` is the phone's tag: degrees clockwise a player turns the frames."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        stream.options = {"bf": "3" if b_frames else "0", **({"g": str(gop)} if gop else {})}
        if times is not None:
            stream.codec_context.time_base = _MS
        if rotation:
            stream.set_display_rotation(-rotation)  # PyAV takes the counter-clockwise angle
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(times[i] * 1000), _MS
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def corrupt_middle(mp4: bytes, start: float = 0.45, end: float = 0.55) -> bytes:
    """The MP4 with the ``start``..``end`` share of its ``mdat`` payload zeroed: the container is
    intact, the frames coded there are not."""
    data, pos = bytearray(mp4), 0
    while pos + 8 <= len(data):
        size, kind = int.from_bytes(data[pos : pos + 4], "big"), bytes(data[pos + 4 : pos + 8])
        if kind == b"mdat":
            first, last = pos + 8, pos + size
            a, b = first + int(start * (last - first)), first + int(end * (last - first))
            data[a:b] = bytes(b - a)
            return bytes(data)
        pos += size
    raise ValueError("no mdat box")


def animated_image(frames: Sequence[np.ndarray], durations_ms: Sequence[int], fmt: str) -> bytes:
    """An animated GIF or (lossless) WebP of the frames, each shown for its duration."""
    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    extra = {"lossless": True} if fmt == "WEBP" else {}
    images[0].save(buf, format=fmt, save_all=True, append_images=images[1:], duration=list(durations_ms),
                   loop=0, **extra)
    return buf.getvalue()
