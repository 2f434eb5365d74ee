"""``/v1/demo/clip`` beside a model that is not the trained demo, and the limits in ``/v1/models``."""

from __future__ import annotations

import httpx


def test_no_demo_clips_beside_another_model(http: httpx.Client) -> None:
    reply = http.post("/v1/demo/clip")
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "no_demo_clips"


def test_models_reports_the_limits_a_client_may_ask_for(http: httpx.Client) -> None:
    limits = http.get("/v1/models").json()["data"][0]["llamavid"]["limits"]
    assert limits["max_fps"] > 0 and limits["max_frames"] >= 1 and limits["max_tokens"] >= 1
    assert limits["max_question_chars"] >= 1 and limits["max_video_bytes"] >= 1
