"""Frame sampling with decord on real encoded videos (spec §6.1).

The videos are made here with PyAV. Each frame spells its index in binary as seven black/white
vertical bars, which survives lossy coding, so a test can tell exactly which frames came back.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from model.video import (
    FrameSampling,
    VideoDecodeError,
    VideoFile,
    VideoInfo,
    load_video,
    mp4_trailing_bytes,
    sample_indices,
)

BITS, BAR = 7, 8
W, H = BITS * BAR + 8, 48


def _frame(index: int) -> np.ndarray:
    img = np.zeros((H, W, 3), np.uint8)
    for b in range(BITS):
        if (index >> b) & 1:
            img[:, b * BAR:(b + 1) * BAR] = 255
    return img


def frame_index(frame: np.ndarray) -> int:
    bars = [frame[:, b * BAR + 2:(b + 1) * BAR - 2].mean() > 127 for b in range(BITS)]
    return sum(int(bit) << b for b, bit in enumerate(bars))


def encode(rate: Fraction | int, count: int) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for i in range(count):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_frame(i), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    """3 s clips at 10 fps (30 frames) and 29.97 fps (90 frames)."""
    folder = tmp_path_factory.mktemp("videos")
    out = {}
    for name, rate, count in (("10fps", 10, 30), ("ntsc", Fraction(30000, 1001), 90)):
        out[name] = folder / f"{name}.mp4"
        out[name].write_bytes(encode(rate, count))
    return out


def indices_of(frames: np.ndarray) -> list[int]:
    return [frame_index(f) for f in frames]


def test_the_encoding_survives(videos) -> None:
    info = VideoFile(videos["ntsc"]).info
    assert info.num_frames == 90 and info.avg_fps == pytest.approx(29.97, abs=1e-2)
    assert (info.width, info.height) == (W, H) and info.duration == pytest.approx(3.0, abs=0.01)
    assert indices_of(VideoFile(videos["ntsc"]).read(list(range(90)))) == list(range(90))


@pytest.mark.parametrize(
    ("video", "fps", "expected"),
    [
        ("10fps", 1.0, [0, 10, 20]),
        ("ntsc", 1.0, [0, 30, 60]),  # step round(29.97) = 30
        ("ntsc", 2.0, [0, 15, 30, 45, 60, 75]),  # round(14.985) = 15
        ("10fps", 3.0, list(range(0, 30, 3))),  # round(3.33) = 3
        ("10fps", 4.0, list(range(0, 30, 2))),  # round(2.5) = 2 (Python rounds half to even)
        ("10fps", 30.0, list(range(30))),  # more than the native rate: every frame
    ],
)
def test_step_from_frame_zero(videos, video: str, fps: float, expected: list[int]) -> None:
    frames, times = load_video(videos[video], FrameSampling(fps=fps))
    assert indices_of(frames) == expected
    avg = VideoFile(videos[video]).info.avg_fps
    assert times == pytest.approx([i / avg for i in expected])


@pytest.mark.parametrize("max_frames", [1, 2, 4, 7, 30])
def test_max_frames_thinning(videos, max_frames: int) -> None:
    frames, _ = load_video(videos["10fps"], FrameSampling(fps=10.0, max_frames=max_frames))
    got = indices_of(frames)
    assert len(got) == max_frames and got[0] == 0
    if max_frames > 1:
        assert got[-1] == 29
        gaps = np.diff(got)
        assert gaps.min() >= 1 and gaps.max() - gaps.min() <= 1  # evenly spaced
        ideal = np.linspace(0, 29, max_frames)
        assert np.abs(np.array(got) - ideal).max() <= 0.5


def test_max_frames_applies_after_the_fps_step(videos) -> None:
    frames, _ = load_video(videos["ntsc"], FrameSampling(fps=2.0, max_frames=3))
    got = indices_of(frames)
    assert len(got) == 3 and got[0] == 0 and got[-1] == 75  # thinned from [0, 15, ..., 75]
    assert set(got) <= set(range(0, 90, 15))


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        (1.0, None, [10, 20]),
        (0.0, 2.0, [0, 10]),  # end is exclusive
        (1.0, 2.5, [10, 20]),
        (0.5, None, [10, 20]),  # the grid still counts from frame 0
        (0.0, 2.01, [0, 10, 20]),
    ],
)
def test_time_range(videos, start: float, end: float | None, expected: list[int]) -> None:
    frames, times = load_video(videos["10fps"], FrameSampling(fps=1.0, start=start, end=end))
    assert indices_of(frames) == expected
    assert times == pytest.approx([i / 10 for i in expected])


def test_empty_range(videos) -> None:
    with pytest.raises(VideoDecodeError, match="no frames"):
        load_video(videos["10fps"], FrameSampling(start=5.0))


def test_bytes_and_path_agree(videos) -> None:
    data = videos["ntsc"].read_bytes()
    a, ta = load_video(videos["ntsc"], FrameSampling(fps=1.0))
    b, tb = load_video(data, FrameSampling(fps=1.0))
    assert np.array_equal(a, b) and ta == tb
    c, _ = load_video(bytearray(data), FrameSampling(fps=1.0))
    assert np.array_equal(a, c)
    assert a.dtype == np.uint8 and a.shape == (3, H, W, 3)


def test_chunked_reading_keeps_order(videos) -> None:
    video = VideoFile(videos["ntsc"])
    wanted = list(range(0, 90, 7))
    chunks = list(video.iter_frames(wanted, chunk=4))
    assert [len(c) for c in chunks] == [4, 4, 4, 1]
    assert indices_of(np.concatenate(chunks)) == wanted


def test_sample_indices_rules() -> None:
    info = VideoInfo(num_frames=95, avg_fps=29.97, width=1, height=1)
    assert sample_indices(info, FrameSampling(fps=1.0)) == [0, 30, 60, 90]
    assert sample_indices(VideoInfo(10, 0.4, 1, 1), FrameSampling(fps=1.0)) == list(range(10))  # step >= 1
    with pytest.raises(ValueError):
        sample_indices(info, FrameSampling(fps=0.0))


def _bad_inputs(videos, tmp_path: Path) -> dict[str, object]:
    good = videos["10fps"].read_bytes()
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video, just a text file with a video name\n" * 50)
    return {
        "empty": b"",
        "truncated": good[: len(good) // 3],
        "text-bytes": text.read_bytes(),
        "text-file": text,
        "garbage": np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes(),
        "missing-file": tmp_path / "missing.mp4",
    }


@pytest.mark.parametrize("kind", ["empty", "truncated", "text-bytes", "text-file", "garbage", "missing-file"])
def test_undecodable_inputs(videos, tmp_path: Path, kind: str) -> None:
    source = _bad_inputs(videos, tmp_path)[kind]
    with pytest.raises(VideoDecodeError):
        load_video(source, FrameSampling(fps=1.0))


def _box(kind: bytes, payload: bytes = b"", *, large: bool = False) -> bytes:
    if large:
        return (1).to_bytes(4, "big") + kind + (16 + len(payload)).to_bytes(8, "big") + payload
    return (8 + len(payload)).to_bytes(4, "big") + kind + payload


def test_bytes_after_the_last_mp4_box_are_counted() -> None:
    clip = (_box(b"ftyp", b"isom\x00\x00\x02\x00") + _box(b"moov", b"\x00" * 40)
            + _box(b"mdat", b"\x01" * 100, large=True))
    assert mp4_trailing_bytes(clip) == 0
    assert mp4_trailing_bytes(clip + b"\x13" * 1000) == 1000  # junk appended
    assert mp4_trailing_bytes(clip[:-30]) == 0  # cut short: decord decides what it can read
    assert mp4_trailing_bytes(_box(b"ftyp", b"isom") + (0).to_bytes(4, "big") + b"mdat" + b"\x01" * 50) == 0
    with pytest.raises(VideoDecodeError, match="1000 bytes after its last box"):
        VideoFile(clip + b"\x13" * 1000)
