"""vLLM's media fields and several media per conversation, against a real ``llamavid serve``.

``uuid`` on media parts (reuse without resending; a forgotten uuid is a 404), ``media_io_kwargs``
and ``mm_processor_kwargs`` as our fps / max_frames, the URL memo end to end, and conversations
with several videos and images (the tiny random model: the layout and the counts, not the answers;
``tests/demo/test_multiple_media.py`` checks answers with the trained demo model).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.server.cache_host import Resource, cache_host
from tests.server.conftest import Videos, _spawn
from tests.server.live import assert_api_error
from tests.serving import Process, wait_ready

CHAT = "/v1/chat/completions"


def png_url(colour: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def video(url: str | None, **extra) -> dict:
    return {"type": "video_url", "video_url": {"url": url} if url is not None else None, **extra}


def image(url: str | None, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": url} if url is not None else None, **extra}


def ask(*parts: dict, question: str = "What happens?", **body) -> dict:
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}],
            "max_tokens": 2, "temperature": 0, **body}


# -- uuid -------------------------------------------------------------------------------------------
def test_a_uuid_reuses_media_without_resending_it(http: httpx.Client, videos: Videos) -> None:
    with cache_host() as host:
        host.resources["/uuid.mp4"] = Resource(videos.fresh("uuid.mp4").read_bytes(), {}, content_type="video/mp4")
        first = http.post(CHAT, json=ask(video(host.url + "/uuid.mp4", uuid="clip-uuid-A")))
        assert first.status_code == 200, first.text
        again = http.post(CHAT, json=ask(video(None, uuid="clip-uuid-A")))
        assert again.status_code == 200, again.text
        assert again.json()["llamavid"]["video_id"] == first.json()["llamavid"]["video_id"]
        # with the URL too, a uuid still held is reused as it stands: no fetch
        third = http.post(CHAT, json=ask(video(host.url + "/uuid.mp4", uuid="clip-uuid-A")))
        assert third.json()["llamavid"]["video_id"] == first.json()["llamavid"]["video_id"]
        assert len(host.requests("/uuid.mp4")) == 1
    pic = http.post(CHAT, json=ask(image(png_url((200, 0, 0)), uuid="pic-uuid-A")))
    assert pic.status_code == 200, pic.text
    assert http.post(CHAT, json=ask(image(None, uuid="pic-uuid-A"))).status_code == 200


def test_a_uuid_nobody_sent_is_a_404_naming_it(http: httpx.Client) -> None:
    reply = http.post(CHAT, json=ask(video(None, uuid="never-sent-42")))
    error = assert_api_error(reply, 404, "never-sent-42", code="media_uuid_not_found")
    assert error["param"] == "messages[0].content[0].uuid"
    assert_api_error(http.post(CHAT, json=ask(image(None))), 400, "url", code="invalid_request")


def test_a_uuid_names_one_kind_of_media(http: httpx.Client, short_video_id: str) -> None:
    assert http.post(CHAT, json=ask(video(short_video_id, uuid="kind-uuid"))).status_code == 200
    reply = http.post(CHAT, json=ask(image(None, uuid="kind-uuid")))
    assert_api_error(reply, 400, "kind-uuid", "video", code="media_uuid_mismatch")


def test_a_deleted_video_forgets_its_uuid(http: httpx.Client, videos: Videos) -> None:
    data = base64.b64encode(videos.fresh("uuid-deleted.mp4").read_bytes()).decode()
    first = http.post(CHAT, json=ask(video("data:video/mp4;base64," + data, uuid="deleted-uuid")))
    assert first.status_code == 200, first.text
    assert http.delete(f"/v1/videos/{first.json()['llamavid']['video_id']}").status_code == 200
    assert_api_error(http.post(CHAT, json=ask(video(None, uuid="deleted-uuid"))), 404, "deleted-uuid",
                     code="media_uuid_not_found")


# -- media_io_kwargs / mm_processor_kwargs ----------------------------------------------------------
def test_vllm_frame_options_are_our_fps_and_max_frames(http: httpx.Client, short_video_id: str) -> None:
    reply = http.post(CHAT, json=ask(video(short_video_id), media_io_kwargs={"video": {"fps": 2}}))
    assert reply.status_code == 200, reply.text
    record = http.get(f"/v1/videos/{reply.json()['llamavid']['video_id']}").json()
    assert record["fps"] == 2 and record["frames_total"] == 6  # 3 s at 2 fps
    reply = http.post(CHAT, json=ask(video(short_video_id), mm_processor_kwargs={"fps": 2, "max_frames": 4}))
    record = http.get(f"/v1/videos/{reply.json()['llamavid']['video_id']}").json()
    assert record["fps"] == 2 and record["frames_total"] == 4
    reply = http.post(CHAT, json=ask(video(short_video_id), fps=2, media_io_kwargs={"video": {"fps": 2.0,
                                                                                            "num_frames": 5}}))
    assert http.get(f"/v1/videos/{reply.json()['llamavid']['video_id']}").json()["frames_total"] == 5


@pytest.mark.parametrize(("body", "status", "words", "code", "param"), [
    ({"fps": 1, "media_io_kwargs": {"video": {"fps": 2}}}, 400, ("fps=1", "media_io_kwargs.video.fps=2"),
     "conflicting_fields", "media_io_kwargs.video.fps"),
    ({"mm_processor_kwargs": {"max_frames": 3, "num_frames": 4}}, 400, ("max_frames",), "conflicting_fields",
     "mm_processor_kwargs.num_frames"),
    ({"mm_processor_kwargs": {"max_pixels": 100}}, 400, ("max_pixels",), "invalid_request", None),
    ({"media_io_kwargs": {"image": {"rgba_background_color": [0, 0, 0]}}}, 400, ("image",), "invalid_request",
     None),
    ({"media_io_kwargs": {"video": {"fps": 100}}}, 400, ("fps", "limit"), "invalid_fps", "fps"),
])
def test_bad_vllm_frame_options(http: httpx.Client, short_video_id: str, body: dict, status: int,
                                words: tuple[str, ...], code: str, param: str | None) -> None:
    error = assert_api_error(http.post(CHAT, json=ask(video(short_video_id), **body)), status, *words, code=code)
    if param is not None:
        assert error["param"] == param


# -- the URL memo, end to end -----------------------------------------------------------------------
def test_a_repeated_video_url_is_downloaded_once_while_fresh(http: httpx.Client, videos: Videos) -> None:
    with cache_host() as host:
        data = videos.fresh("memo-fresh.mp4").read_bytes()
        host.resources["/fresh.mp4"] = Resource(data, {"Cache-Control": "max-age=600"}, content_type="video/mp4")
        host.resources["/no-store.mp4"] = Resource(data, {"Cache-Control": "no-store"}, etag='"n"',
                                                   content_type="video/mp4")
        host.resources["/stale.mp4"] = Resource(data, {"Cache-Control": "no-cache"}, etag='"s"',
                                                content_type="video/mp4")
        for _ in range(2):
            for path in ("/fresh.mp4", "/no-store.mp4", "/stale.mp4"):
                reply = http.post(CHAT, json=ask(video(host.url + path)))
                assert reply.status_code == 200, reply.text
        assert host.requests("/fresh.mp4") == [(200, {})]
        assert host.requests("/no-store.mp4") == [(200, {}), (200, {})]
        assert host.requests("/stale.mp4") == [(200, {}), (304, {"If-None-Match": '"s"'})]


# -- several media ----------------------------------------------------------------------------------
def test_models_mark_several_media_experimental(http: httpx.Client) -> None:
    card = http.get("/v1/models").json()["data"][0]["llamavid"]
    assert "multiple_media" in card["experimental"] and card["max_media"] == 4
    assert card["limits"]["max_media"] == 4 and card["limits"]["max_total_frames"] >= 1


def test_two_videos_and_an_image_in_two_turns(http: httpx.Client, short_video_id: str, videos: Videos) -> None:
    other = base64.b64encode(videos.fresh("second-of-two.mp4", seconds=5).read_bytes()).decode()
    body = {"messages": [
        {"role": "user", "content": [video(short_video_id), {"type": "text", "text": "What is in this one?"}]},
        {"role": "assistant", "content": "A grey screen."},
        {"role": "user", "content": [video("data:video/mp4;base64," + other), image(png_url((0, 0, 200))),
                                     {"type": "text", "text": "And in these?"}]}],
        "max_tokens": 2, "temperature": 0, "relevance": True}
    reply = http.post(CHAT, json=body)
    assert reply.status_code == 200, reply.text
    ext, usage = reply.json()["llamavid"], reply.json()["usage"]
    assert [m["kind"] for m in ext["media"]] == ["video", "video", "image"]
    assert ext["video_id"] == short_video_id == ext["media"][0]["video_id"]
    used = {m["index"]: (m["frames_used"], m["frames_total"]) for m in ext["media"]}
    assert used == {0: (3, 3), 1: (5, 5), 2: (1, 1)}
    assert (ext["frames_used"], ext["frames_total"]) == (8, 8)
    per_frame = http.get("/v1/models").json()["data"][0]["llamavid"]["tokens_per_frame"]
    assert usage["visual_tokens"] == 9 * per_frame
    assert [(r["media_index"], r["video_id"], len(r["frames"])) for r in ext["relevance"]] == [
        (0, short_video_id, 3), (1, ext["media"][1]["video_id"], 5)]
    # streamed: one relevance chunk per video, the per-media usage on the finish chunk
    chunks = [json.loads(line[5:]) for line in http.post(CHAT, json={**body, "stream": True}).text.splitlines()
              if line.startswith("data:") and line[5:].strip() != "[DONE]"]
    relevance = [c["llamavid"] for c in chunks if c.get("llamavid", {}).get("type") == "relevance"]
    assert [(r["media_index"], r["video_id"]) for r in relevance] == [(0, short_video_id),
                                                                     (1, ext["media"][1]["video_id"])]
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [m["frames_used"] for m in finish[-1]["llamavid"]["media"]] == [3, 5, 1]


def test_the_same_video_sent_with_every_turn_is_one_video(http: httpx.Client, short_video_id: str) -> None:
    part = video(short_video_id)
    body = {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "a?"}]},
                         {"role": "assistant", "content": "b"},
                         {"role": "user", "content": [part, {"type": "text", "text": "c?"}]}], "max_tokens": 2}
    reply = http.post(CHAT, json=body)
    assert reply.status_code == 200, reply.text
    assert "media" not in reply.json()["llamavid"]  # one medium: the official single-video prompt


# -- the limits -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Process]:
    process = _spawn(tmp_path_factory.mktemp("limits"), tiny_checkpoint, max_media=2, max_total_frames=5)
    try:
        wait_ready(process, timeout=180)
        yield process
    finally:
        process.stop()
    assert "Traceback" not in process.output()


def test_more_media_than_max_media_is_a_400_naming_the_limit(small_server: Process, videos: Videos) -> None:
    parts = [image(png_url((i, 0, 0))) for i in range(3)]
    reply = httpx.post(small_server.url + CHAT, json=ask(*parts), timeout=60)
    error = assert_api_error(reply, 400, "at most 2", "max_media", code="too_many_media")
    assert error["param"] == "messages[0].content[2]"
    assert httpx.post(small_server.url + CHAT, json=ask(*parts[:2]), timeout=60).status_code == 200


def test_too_many_frames_over_all_videos_is_a_400(small_server: Process, videos: Videos) -> None:
    short = "data:video/mp4;base64," + base64.b64encode(videos.short.read_bytes()).decode()  # 3 frames
    other = "data:video/mp4;base64," + base64.b64encode(videos.fresh("limit-2.mp4").read_bytes()).decode()  # 4
    reply = httpx.post(small_server.url + CHAT, json=ask(video(short), video(other)), timeout=60)
    error = assert_api_error(reply, 400, "5 frames", "max_total_frames", code="too_many_frames")
    assert error["param"] == "messages[0].content[1]"
    assert httpx.post(small_server.url + CHAT, json=ask(video(short)), timeout=60).status_code == 200
