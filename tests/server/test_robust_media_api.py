"""The awkward files users send, through the real service: a phone video with rotation metadata,
animated GIF and WebP, a variable-frame-rate screen recording, a file with a corrupt stretch in the
middle, and audio with no pictures. Each video answers; each record says what the decoder did
(rotation, frames left out, presentation times); the frame strip matches what the model saw.

The files are made by the tests (``tests.model.video_media``): frames spell their index in bars,
so which frames were sampled can be read back from the thumbnails.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from model.video import FrameSampling, VideoFile, sample_indices
from tests.model.media import write_media
from tests.model.video_media import animated_image, bar_frame, corrupt_middle, encode_video, frame_index
from tests.server.live import wait_ready_video
from tests.serving import Process

QUESTION = "What happens in the video?"


def bars(count: int) -> list[np.ndarray]:
    return [bar_frame(i) for i in range(count)]


def upload(http: httpx.Client, data: bytes, name: str, mime: str) -> dict:
    reply = http.post("/v1/videos", files={"file": (name, data, mime)}, data={"fps": "1"})
    assert reply.status_code == 202, reply.text
    return wait_ready_video(http, reply.json()["id"])


def ask(http: httpx.Client, video_id: str) -> dict:
    reply = http.post("/v1/ask", json={"video_id": video_id, "question": QUESTION, "max_tokens": 3})
    assert reply.status_code == 200, reply.text
    return reply.json()


def thumbnail(http: httpx.Client, video_id: str, index: int) -> np.ndarray:
    reply = http.get(f"/v1/videos/{video_id}/frames/{index}.jpg")
    assert reply.status_code == 200, reply.text
    return np.asarray(Image.open(io.BytesIO(reply.content)).convert("RGB"))


def thumbnail_indices(http: httpx.Client, record: dict) -> list[int]:
    """Which source frames the frame strip shows (the bars survive a JPEG at thumbnail size)."""
    width = 64  # bar frames are 64 px wide: read them back at that size
    out = []
    for i in range(record["frames_total"]):
        image = Image.fromarray(thumbnail(http, record["id"], i))
        out.append(frame_index(np.asarray(image.resize((width, round(image.height * width / image.width))))))
    return out


def test_a_rotated_phone_video_answers_with_portrait_frames_and_thumbnails(server: Process) -> None:
    landscape = np.zeros((48, 96, 3), np.uint8)  # as the sensor stored it: 96 x 48
    landscape[:, :48] = (255, 0, 0)  # the left half red: the top once turned 90 degrees clockwise
    clip = encode_video([landscape] * 20, rate=10, rotation=90)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        record = upload(http, clip, "phone.mp4", "video/mp4")
        assert record["rotation"] == 90 and (record["width"], record["height"]) == (48, 96)
        answer = ask(http, record["id"])
        assert answer["frames_used"] == answer["frames_total"] == 2
        for i in range(2):
            thumb = thumbnail(http, record["id"], i)
            assert thumb.shape[0] > thumb.shape[1]  # portrait, as the phone showed it
            top, bottom = thumb[: thumb.shape[0] // 3].mean((0, 1)), thumb[-thumb.shape[0] // 3 :].mean((0, 1))
            assert top[0] > 200 and bottom[0] < 60  # red at the top, not on a side


@pytest.mark.parametrize(("fmt", "mime"), [("GIF", "image/gif"), ("WEBP", "image/webp")])
def test_an_animated_image_is_a_video_with_its_own_timing(server: Process, fmt: str, mime: str) -> None:
    # 10 frames: five of 100 ms, five of 300 ms (2 s); 1 fps samples 0 s and the frame shown at 1 s
    data = animated_image(bars(10), [100] * 5 + [300] * 5, fmt)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        record = upload(http, data, f"loop.{fmt.lower()}", mime)
        assert record["timestamps"] == pytest.approx([0.0, 1.1])
        assert thumbnail_indices(http, record) == [0, 7]
        assert ask(http, record["id"])["frames_used"] == 2


def test_an_animated_gif_by_data_url_in_chat(openai_client) -> None:
    url = "data:image/gif;base64," + base64.b64encode(animated_image(bars(10), [200] * 10, "GIF")).decode()
    completion = openai_client.chat.completions.create(model="tiny", max_tokens=2, messages=[{
        "role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                    {"type": "text", "text": QUESTION}]}])
    assert completion.usage.model_extra["visual_tokens"] == 2 * 2  # 2 s at 1 fps, two tokens a frame
    assert completion.model_extra["llamavid"]["video_id"].startswith("vid-")


def test_a_variable_frame_rate_video_is_sampled_by_presentation_time(server: Process) -> None:
    times = [i / 10 for i in range(30)] + [3.0 + i / 2 for i in range(12)]  # 10 fps for 3 s, then 2 fps
    clip = encode_video(bars(len(times)), times=times)
    with VideoFile(clip) as video:
        expected = sample_indices(video.info, FrameSampling(fps=1.0))
    with httpx.Client(base_url=server.url, timeout=60) as http:
        record = upload(http, clip, "screen.mp4", "video/mp4")
        assert record["timestamps"] == pytest.approx([times[i] for i in expected], abs=1e-3)
        assert thumbnail_indices(http, record) == expected
        assert ask(http, record["id"])["frames_used"] == len(expected)


def test_a_corrupt_stretch_is_left_out_and_counted(server: Process) -> None:
    clip = corrupt_middle(encode_video(bars(100), rate=10, gop=10, b_frames=False))
    with httpx.Client(base_url=server.url, timeout=60) as http:
        record = upload(http, clip, "damaged.mp4", "video/mp4")
        skipped = record["frames_skipped"]
        assert 0 < skipped < 10 and record["frames_total"] == 10 - skipped
        shown = thumbnail_indices(http, record)
        assert shown[0] == 0 and shown[-1] == 90 and len(shown) == 10 - skipped
        assert record["timestamps"] == pytest.approx([i / 10 for i in shown])
        answer = ask(http, record["id"])
        assert answer["frames_used"] == answer["frames_total"] == 10 - skipped
        assert answer["usage"]["visual_tokens"] == 2 * (10 - skipped)


def test_audio_without_pictures_is_a_clear_415(server: Process, tmp_path) -> None:
    m4a = write_media(tmp_path / "speech.m4a", video=False, audio=True, seconds=1.0).read_bytes()
    with httpx.Client(base_url=server.url, timeout=60) as http:
        reply = http.post("/v1/videos", files={"file": ("speech.m4a", m4a, "audio/mp4")})
        assert reply.status_code == 415, reply.text
        error = reply.json()["error"]
        assert error["code"] == "audio_only" and "audio only" in error["message"]
        # the server is unharmed: the next upload works
        assert upload(http, encode_video(bars(10), rate=10), "fine.mp4", "video/mp4")["frames_total"] == 1
