"""Two demo clips in one conversation (experimental several-media support), through the real service
and the unmodified openai client, answered by the trained demo model.

What the tiny demo model can do with two labelled blocks (it was trained on one clip per prompt):
it never learned to tell "Video 1" from "Video 2" in a question, so a shape both clips hold is
ambiguous to it; asked about a shape only one clip holds, it finds it in either block, not
always (9 of 13 such questions right, 3 of 4 as the second of two turns, in a probe over 12
pairs of fresh clips, seeds 30,000-30,023, with the checkpoint trained with JSON answers). So the clips here differ in the shape asked about: each question can only
be answered from one block, and each is answered right: from the first block, and from the second.
The pair is the probe's one pair where every such question came out right; what the test guards
is that both blocks reach the LLM whole (the counts: visual tokens, frames per video) and that
the answer can come from either.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from model.demo import data
from model.demo.evaluate import normalise
from tests.server.live import wait_ready_video
from tests.serving import Process

SEEDS = (30_012, 30_013)  # clips that share a shape and each hold one the other lacks


@pytest.fixture(scope="module")
def clips(demo_server: Process, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, dict, data.Shape]]:
    """(video id, its record, the shape only that clip holds) for each clip."""
    folder = tmp_path_factory.mktemp("clips")
    scenes = [data.make_example(seed, "binding").scene for seed in SEEDS]
    kinds = [{s.kind for s in scene.shapes} for scene in scenes]
    out = []
    with httpx.Client(base_url=demo_server.url, timeout=120) as http:
        for i, scene in enumerate(scenes):
            own = [s for s in scene.shapes if s.kind not in kinds[1 - i]]
            assert own, "the clips must differ in a shape"
            path = data.write_clip(scene, folder / f"clip-{i}.mp4")
            with Path(path).open("rb") as f:
                upload = http.post("/v1/videos", files={"file": (path.name, f, "video/mp4")})
            assert upload.status_code == 202, upload.text
            record = wait_ready_video(http, upload.json()["id"])
            out.append((record["id"], record, own[0]))
    return out


def video(video_id: str) -> dict:
    return {"type": "video_url", "video_url": {"url": video_id}}


def test_one_question_about_each_of_two_clips(demo_server: Process, clips) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{demo_server.url}/v1", api_key="unused")
    per_frame = httpx.get(f"{demo_server.url}/v1/models").json()["data"][0]["llamavid"]["tokens_per_frame"]
    frames = [record["frames_total"] for _, record, _ in clips]
    for _, _, shape in clips:
        reply = client.chat.completions.create(
            model="llama-vid", temperature=0, max_tokens=6,
            messages=[{"role": "user", "content": [video(clips[0][0]), video(clips[1][0]),
                                                    {"type": "text", "text": f"What colour is the {shape.kind}?"}]}])
        assert normalise(reply.choices[0].message.content) == shape.colour, (shape, reply)
        ext = reply.model_extra["llamavid"]
        assert [(m["video_id"], m["frames_used"]) for m in ext["media"]] == [
            (clips[0][0], frames[0]), (clips[1][0], frames[1])]
        assert reply.usage.model_extra["visual_tokens"] == per_frame * sum(frames)  # both blocks, whole


def test_a_second_turn_asks_about_the_second_clip(demo_server: Process, clips) -> None:
    (first, _, one), (second, _, two) = clips
    body = {"temperature": 0, "max_tokens": 6, "messages": [
        {"role": "user", "content": [video(first), {"type": "text", "text": f"What colour is the {one.kind}?"}]},
        {"role": "assistant", "content": one.colour},
        {"role": "user", "content": [video(second), {"type": "text", "text": f"What colour is the {two.kind}?"}]}]}
    reply = httpx.post(f"{demo_server.url}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert normalise(reply.json()["choices"][0]["message"]["content"]) == two.colour, reply.json()
    assert [m["video_id"] for m in reply.json()["llamavid"]["media"]] == [first, second]
