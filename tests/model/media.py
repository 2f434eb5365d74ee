"""Small media files for the tests, written with PyAV: video, a tone, text subtitle tracks.

NOTE: reconstructed from its call sites after the original file was overwritten by mistake (see
the ingest helper's report); compare it with the original and keep whichever is right.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

SAMPLE_RATE = 44_100
TONE_HZ = 440.0
# The ASS header text subtitle encoders expect (the one ffmpeg writes for converted tracks).
ASS_HEADER = (
    "[Script Info]\nScriptType: v4.00+\nPlayResX: 384\nPlayResY: 288\nScaledBorderAndShadow: yes\n\n"
    "[V4+ Styles]\nFormat: Name, Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour, BackColour, "
    "Bold, Italic, Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle, BorderStyle, Outline, Shadow, Alignment, "
    "MarginL, MarginR, MarginV, Encoding\n"
    "Style: Default,Arial,16,&Hffffff,&Hffffff,&H0,&H0,0,0,0,0,100,100,0,0,1,1,0,2,10,10,10,0\n\n"
    "[Events]\nFormat: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text\n"
)
_MS = Fraction(1, 1000)


def write_media(path: Path, *, seconds: float = 4.0, fps: int = 10, size: tuple[int, int] = (32, 32),
                video: bool = True, audio: bool = False, cues: Sequence[tuple[float, float, str]] | None = None,
                subtitle_codec: str | None = None) -> Path:
    """A file at ``path`` (container from its suffix) with, as asked: H.264 video of grey frames
    (``size`` = height, width; ``fps``), a 440 Hz AAC tone (44.1 kHz stereo) and a text subtitle
    track of ``cues`` (start, end, ASS event text) in ``subtitle_codec``."""
    import av

    with av.open(str(path), "w") as out:  # every stream is added before the first packet is muxed
        writers = []
        if video:
            writers.append(_video_writer(out, seconds, fps, size))
        if audio:
            writers.append(_tone_writer(out, seconds))
        if cues:
            writers.append(_cue_writer(out, cues, subtitle_codec or out.default_subtitle_codec))
        for write in writers:
            write()
    return path


def _video_writer(out, seconds: float, fps: int, size: tuple[int, int]):
    import av

    stream = out.add_stream("libx264", rate=fps)
    stream.height, stream.width = size
    stream.pix_fmt = "yuv420p"

    def write() -> None:
        n = int(round(seconds * fps))
        for i in range(n):
            level = int(round(255 * i / max(1, n - 1)))
            frame = av.VideoFrame.from_ndarray(np.full((*size, 3), level, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)

    return write


def _tone_writer(out, seconds: float):
    import av

    stream = out.add_stream("aac", rate=SAMPLE_RATE)
    stream.layout = "stereo"

    def write() -> None:
        block, total = 1024, int(round(seconds * SAMPLE_RATE))
        for start in range(0, total, block):
            t = np.arange(start, min(total, start + block)) / SAMPLE_RATE
            wave = (0.5 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(np.stack([wave, wave]), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = SAMPLE_RATE, start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)

    return write


def _cue_writer(out, cues: Sequence[tuple[float, float, str]], codec: str):
    from av.subtitles.subtitle import SubtitleSet

    stream = out.add_stream(codec)
    stream.codec_context.subtitle_header = ASS_HEADER.encode()
    stream.time_base = stream.codec_context.time_base = _MS

    def write() -> None:
        for order, (start, end, text) in enumerate(cues):
            duration = round((end - start) * 1000)
            line = f"{order},0,Default,,0,0,0,,{text}".encode()  # an ASS event without its times
            event = SubtitleSet.create(line, 0, duration, round(start * 1000))
            packet = stream.codec_context.encode_subtitle(event)
            packet.stream = stream
            packet.pts = packet.dts = round(start * 1000)
            packet.duration, packet.time_base = duration, _MS
            out.mux(packet)

    return write
