"""Robust decoding (issue 13): rotation metadata, animated GIF/WebP, variable frame rate, corrupt
stretches, audio-only files, and the decoders' choice (PyAV's pixels equal decord's, decord keeps
10-bit, PyAV indexes what decord cannot open).

Media are made here (``tests.model.video_media``); frames spell their index in bars, so each test
checks exactly which frames came back.
"""

from __future__ import annotations

from pathlib import Path

import decord
import numpy as np
import pytest

import model.decoders as decoders
from model.video import FrameSampling, VideoDecodeError, VideoFile, load_video, sample_indices
from tests.model.media import write_media
from tests.model.video_media import animated_image, bar_frame, corrupt_middle, encode_video, frame_index


def indices_of(frames: np.ndarray) -> list[int]:
    return [frame_index(f) for f in frames]


def bars(count: int) -> list[np.ndarray]:
    return [bar_frame(i) for i in range(count)]


# -- rotation --------------------------------------------------------------------------------------
PORTRAIT = (96, 64)  # displayed height, width
MARKS = {"red": ((0, 0), (255, 0, 0)), "green": ((0, 48), (0, 255, 0)), "blue": ((80, 0), (0, 0, 255))}


def upright_picture() -> np.ndarray:
    """A portrait picture with a coloured 16 px block in three corners: any turn or flip shows."""
    image = np.zeros((*PORTRAIT, 3), np.uint8)
    for (y, x), colour in MARKS.values():
        image[y : y + 16, x : x + 16] = colour
    return image


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_a_rotated_phone_video_comes_out_upright(rotation: int) -> None:
    # The phone stores the sensor's picture and a tag saying how far to turn it clockwise for display.
    sensor = np.rot90(upright_picture(), k=rotation // 90)
    video = VideoFile(encode_video([sensor] * 5, rotation=rotation))
    assert video.info.rotation == rotation
    assert (video.info.height, video.info.width) == PORTRAIT  # the displayed size
    frames = video.read(list(range(5)))
    assert frames.shape == (5, *PORTRAIT, 3) and frames.flags.c_contiguous
    for (y, x), colour in MARKS.values():
        block = frames[:, y + 4 : y + 12, x + 4 : x + 12].reshape(-1, 3).mean(0)
        assert np.abs(block - colour).max() < 40, (rotation, colour, block)


def test_an_unrotated_video_reports_rotation_zero() -> None:
    video = VideoFile(encode_video([upright_picture()] * 3))
    assert video.info.rotation == 0 and (video.info.height, video.info.width) == PORTRAIT


# -- animated images -------------------------------------------------------------------------------
UNEVEN_MS = [100] * 5 + [300] * 5  # 10 frames over 2 s: starts 0, .1, .2, .3, .4, .5, .8, 1.1, 1.4, 1.7
UNEVEN_STARTS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.8, 1.1, 1.4, 1.7]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_images_are_videos_with_their_own_timing(fmt: str) -> None:
    video = VideoFile(animated_image(bars(10), UNEVEN_MS, fmt))
    info = video.info
    assert info.num_frames == 10 and info.avg_fps == pytest.approx(5.0)
    assert info.duration == pytest.approx(2.0)
    assert info.variable_frame_rate and (info.width, info.height) == (64, 48)
    assert video.timestamps(list(range(10))) == pytest.approx(UNEVEN_STARTS)
    assert indices_of(video.read(list(range(10)))) == list(range(10))
    # 1 fps at the average 5 fps: the official grid [0, 5] means 0 s and 1 s; nearest 1 s is frame 7 (1.1 s).
    frames, times = load_video(animated_image(bars(10), UNEVEN_MS, fmt), FrameSampling(fps=1.0))
    assert indices_of(frames) == [0, 7] and times == pytest.approx([0.0, 1.1])


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_evenly_timed_animations_keep_the_index_rule(fmt: str) -> None:
    info = VideoFile(animated_image(bars(10), [100] * 10, fmt)).info
    assert info.num_frames == 10 and info.avg_fps == pytest.approx(10.0) and not info.variable_frame_rate
    assert sample_indices(info, FrameSampling(fps=5.0)) == [0, 2, 4, 6, 8]


def test_zero_frame_durations_play_at_browser_speed() -> None:
    info = VideoFile(animated_image(bars(4), [0] * 4, "GIF")).info
    assert info.avg_fps == pytest.approx(10.0)  # 0 ms frames are shown for 100 ms, as browsers do


# -- variable frame rate ---------------------------------------------------------------------------
# 3 s at 10 fps, then 6 s at 2 fps (a screen recording that idles): 42 frames over 9 s.
VFR_TIMES = [i / 10 for i in range(30)] + [3.0 + i / 2 for i in range(12)]


@pytest.fixture(scope="module")
def vfr_clip() -> bytes:
    return encode_video(bars(len(VFR_TIMES)), times=VFR_TIMES)


def test_variable_frame_rate_is_sampled_by_presentation_time(vfr_clip: bytes) -> None:
    video = VideoFile(vfr_clip)
    info = video.info
    assert info.variable_frame_rate and info.num_frames == 42
    assert 8.5 < info.duration <= 9.0  # the muxer gives the last frame its own duration
    assert info.avg_fps == pytest.approx(42 / info.duration)
    indices = sample_indices(info, FrameSampling(fps=1.0))
    # The official rule's times at the average rate, and the frame shown nearest each (by brute force).
    grid = range(0, 42, round(info.avg_fps))
    expected = [int(np.argmin([abs(t - i / info.avg_fps) for t in VFR_TIMES])) for i in grid]
    assert indices == expected and indices != list(grid)  # the index rule would land elsewhere
    assert video.timestamps(indices) == pytest.approx([VFR_TIMES[i] for i in indices], abs=1e-3)
    assert indices_of(video.read(indices)) == indices
    assert video.indices_at([0.0, 3.4, 7.6]) == [0, 31, 39]


def test_a_constant_frame_rate_keeps_the_official_rule() -> None:
    video = VideoFile(encode_video(bars(30), rate=10))
    assert not video.info.variable_frame_rate and video.info.frame_times is None
    assert sample_indices(video.info, FrameSampling(fps=3.0)) == list(range(0, 30, 3))
    assert video.timestamps([0, 9]) == [0.0, 0.9]


# -- corrupt stretches -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corrupt_clip() -> bytes:
    """10 s at 10 fps, a keyframe every second, the middle tenth of the coded frames zeroed."""
    return corrupt_middle(encode_video(bars(100), rate=10, gop=10, b_frames=False))


def test_a_corrupt_stretch_is_skipped_not_fatal(corrupt_clip: bytes) -> None:
    video = VideoFile(corrupt_clip)
    chunks = list(video.iter_frames(list(range(100)), chunk=16))
    decoded = [i for c in chunks for i in c.indices]
    skipped = [i for c in chunks for i in c.skipped]
    assert sorted(decoded + skipped) == list(range(100)) and video.frames_skipped == len(skipped) > 0
    assert min(skipped) > 20 and max(skipped) < 80  # the frames before and after the stretch are there
    # Only real frames: nothing concealed (grey, stale or predicted from lost references) passes.
    assert indices_of(np.concatenate(chunks)) == decoded
    assert all(len(c) == len(c.indices) for c in chunks)


def test_sampling_across_a_corrupt_stretch(corrupt_clip: bytes) -> None:
    frames, times = load_video(corrupt_clip, FrameSampling(fps=1.0))
    got = indices_of(frames)
    assert got[0] == 0 and got[-1] == 90 and 0 < 10 - len(got) < 4
    assert times == pytest.approx([i / 10 for i in got])


def test_nothing_decodable_is_an_error(corrupt_clip: bytes) -> None:
    video = VideoFile(corrupt_clip)
    skipped = [i for c in video.iter_frames(list(range(100))) for i in c.skipped]
    with pytest.raises(VideoDecodeError, match="none of the"):
        VideoFile(corrupt_clip).read(skipped)


# -- not a video -----------------------------------------------------------------------------------
def test_an_audio_only_file_says_so(tmp_path: Path) -> None:
    audio = write_media(tmp_path / "speech.m4a", video=False, audio=True, seconds=1.0)
    for source in (audio, audio.read_bytes()):
        with pytest.raises(VideoDecodeError, match="audio only, no video stream") as caught:
            VideoFile(source)
        assert caught.value.code == "audio_only"


# -- which decoder -----------------------------------------------------------------------------------
def test_pyav_pixels_equal_decords(tmp_path: Path) -> None:
    """8-bit frames come from PyAV (faster); they are decord's (the official code's) bit for bit,
    B-frames and all, whatever the sampling skips."""
    path = tmp_path / "clip.mp4"
    path.write_bytes(encode_video(bars(60), rate=30))
    reader = decord.VideoReader(str(path), num_threads=1)
    for fps in (30.0, 4.0, 1.0):
        indices = sample_indices(VideoFile(path).info, FrameSampling(fps=fps))
        assert np.array_equal(VideoFile(path).read(indices), reader.get_batch(indices).asnumpy()), fps


def test_ten_bit_video_is_decoded_by_decord(tmp_path: Path) -> None:
    path = tmp_path / "hdr.mp4"
    path.write_bytes(encode_video(bars(20), rate=10, pix_fmt="yuv420p10le"))
    frames = VideoFile(path).read(list(range(0, 20, 3)))
    assert indices_of(frames) == list(range(0, 20, 3))
    reference = decord.VideoReader(str(path), num_threads=1).get_batch(list(range(0, 20, 3))).asnumpy()
    assert np.array_equal(frames, reference)


def test_what_decord_cannot_open_pyav_indexes(monkeypatch: pytest.MonkeyPatch, vfr_clip: bytes) -> None:
    """AV1 and other codecs decord's FFmpeg 4.1 lacks: PyAV's packets give the same frame table."""
    indexed_by_decord = VideoFile(vfr_clip)
    monkeypatch.setattr(decoders, "_decord_reader", lambda path: None)
    indexed_by_pyav = VideoFile(vfr_clip)
    a, b = indexed_by_pyav.info, indexed_by_decord.info
    assert (a.num_frames, a.width, a.height, a.rotation) == (b.num_frames, b.width, b.height, b.rotation)
    assert a.avg_fps == pytest.approx(b.avg_fps, rel=1e-6)  # decord keeps times in float32
    np.testing.assert_allclose(a.frame_times, b.frame_times, atol=1e-6)
    indices = sample_indices(indexed_by_pyav.info, FrameSampling(fps=2.0))
    assert indices_of(indexed_by_pyav.read(indices)) == indices


def test_mpeg_ts_frames_are_the_right_ones() -> None:
    """MPEG-TS seeks land a keyframe late (and decord's frames are a GOP off): by presentation
    time, forwards, backwards and from the start, the frames asked for are the ones returned."""
    video = VideoFile(encode_video(bars(80), rate=10, gop=10, fmt="mpegts"))
    assert video.info.num_frames == 80
    for wanted in ([0, 1, 2], [75, 5, 44, 3, 79], list(range(0, 80, 7))):
        assert [frame_index(video.read([i])[0]) for i in wanted] == wanted
    assert indices_of(video.read(list(range(0, 80, 7)))) == list(range(0, 80, 7))
