"""Real encoded test videos, made with PyAV: each frame's colour encodes its index."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np


def frame_level(index: int, num_frames: int) -> int:
    return int(round(255 * index / max(1, num_frames - 1)))


def write_video(path: Path, *, seconds: float = 3.0, fps: float = 10.0, size: tuple[int, int] = (64, 96),
                codec: str = "libx264", frames: np.ndarray | None = None) -> Path:
    """A video whose frame ``i`` is a flat grey of ``frame_level(i, n)`` (or the given frames)."""
    import av

    height, width = size if frames is None else frames.shape[1:3]
    n = int(round(seconds * fps)) if frames is None else len(frames)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n):
            image = frames[i] if frames is not None else np.full((height, width, 3), frame_level(i, n), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
