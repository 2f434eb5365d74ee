"""Videos longer than the context, on the trained demo model behind the real service.

The demo model's context is 512 tokens, so a few hundred frames already do not fit: the shape of
an hour-long question on a 4K- or 64K-context checkpoint, at a size a CPU runs in seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from model.demo import data, is_trained_demo, shipped_dir
from tests.model.media import write_media
from tests.server.live import wait_ready_video
from tests.serving import Process, start_server

CONTEXT = 512  # the demo checkpoint's max_token
# Six 100-second scenes of one static shape each, at 1 fps: 600 frames, 1,200 visual tokens.
SCENES = [("circle", "red"), ("square", "blue"), ("triangle", "green"), ("square", "yellow"),
          ("circle", "purple"), ("triangle", "orange")]
SCENE_SECONDS = 100


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    folder = shipped_dir()
    assert folder is not None and is_trained_demo(folder), "the trained demo checkpoint is not in model/demo/checkpoint"
    server = start_server(tmp_path_factory.mktemp("demo-long"), folder)  # default settings
    yield server
    server.stop()


def upload(http: httpx.Client, path: Path) -> dict:
    reply = http.post("/v1/videos", files={"file": (path.name, path.read_bytes(), "video/mp4")})
    assert reply.status_code == 202, reply.text
    return wait_ready_video(http, reply.json()["id"], timeout=600)


def test_a_two_hour_video_with_default_settings_is_thinned_to_fit(demo: Process, tmp_path: Path) -> None:
    video = write_media(tmp_path / "two-hours.mp4", seconds=2 * 3600, fps=1)  # 32x32, 7,200 frames
    with httpx.Client(base_url=demo.url, timeout=600) as http:
        record = upload(http, video)
        assert record["frames_total"] == 3600 and record["duration"] == pytest.approx(7200, abs=1)
        reply = http.post("/v1/ask", json={"video_id": record["id"], "question": "How many shapes are there?"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["frames_total"] == 3600 and 1 <= body["frames_used"] < 3600
    assert body["usage"]["visual_tokens"] == 2 * body["frames_used"]
    # the default max_tokens (512) keeps a quarter of the context for the answer; the frames fill the rest
    budget = CONTEXT - CONTEXT // 4
    assert budget - 2 < body["usage"]["prompt_tokens"] <= budget
    assert body["usage"]["total_tokens"] <= CONTEXT


def _scenes_clip(path: Path) -> Path:
    frames = [data.render(data.Scene("static", SCENE_SECONDS, 64, (data.Shape(
        kind, colour, 0.2, (0.5, 0.5), (0.0, 0.0), (0, SCENE_SECONDS)),))) for kind, colour in SCENES]
    path.write_bytes(data.encode_clip(np.concatenate(frames)))
    return path


def _scene(frame: dict) -> int:
    return int(frame["time"]) // SCENE_SECONDS


def test_relevant_selection_keeps_the_frames_of_the_asked_about_shape(demo: Process, tmp_path: Path) -> None:
    with httpx.Client(base_url=demo.url, timeout=300) as http:
        video_id = upload(http, _scenes_clip(tmp_path / "six-scenes.mp4"))["id"]
        chosen, moments = {}, {}
        for question, scene in (("Is there a blue shape?", 1), ("Which shape is red?", 0)):
            reply = http.post("/v1/ask", json={"video_id": video_id, "question": question, "max_tokens": 4,
                                               "frame_selection": "relevant", "relevance": True})
            assert reply.status_code == 200, reply.text
            body = reply.json()
            frames = body["relevance"]["frames"]
            assert len(frames) == 600 and body["frames_total"] == 600 and body["frames_used"] < 600
            used = [f for f in frames if f["used"]]
            assert len(used) == body["frames_used"]
            # every frame of the scene the question is about is kept, and it is the one kept most
            assert all(f["used"] for f in frames if _scene(f) == scene), question
            per_scene = np.bincount([_scene(f) for f in used], minlength=len(SCENES))
            assert per_scene.argmax() == scene and per_scene[scene] == SCENE_SECONDS, (question, per_scene)
            chosen[question] = {f["index"] for f in used}
            moments[question] = body["moments"]
            top = body["moments"][0]
            assert scene * SCENE_SECONDS <= top["start"] < top["end"] <= (scene + 1) * SCENE_SECONDS + 1, top
            assert top["thumbnail_url"].endswith(f"/v1/videos/{video_id}/frames/{top['frame']}.jpg")
            assert http.get(top["thumbnail_url"]).headers["content-type"] == "image/jpeg"
        assert chosen["Is there a blue shape?"] != chosen["Which shape is red?"]

        # uniform thinning (the default) spreads the same number of frames evenly instead
        uniform = http.post("/v1/ask", json={"video_id": video_id, "question": "Is there a blue shape?",
                                             "max_tokens": 4, "relevance": True}).json()
    used = [f for f in uniform["relevance"]["frames"] if f["used"]]
    counts = np.bincount([_scene(f) for f in used], minlength=len(SCENES))
    assert counts.max() - counts.min() <= 1 and len(used) == uniform["frames_used"]
