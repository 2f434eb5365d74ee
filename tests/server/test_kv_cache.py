"""Admission by memory, for real: a server whose KV cache holds about two long questions.

Sixteen questions about a 150-frame video (some 430 positions of prompt each, plus their token
budget) arrive at once. They wait for room in the cache and every one answers exactly what it
answers alone; nothing fails, nothing hangs, and the cache's usage metric never passes 100 %. A
video with more frames than the cache holds is thinned to fit it; a conversation that leaves no
room for a frame is a 400 up front. (Preemption to host memory and back is exercised in process,
in ``tests/server/worker/test_runner.py``.)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.server.live import assert_api_error, scrape, wait_ready_video
from tests.serving import Process, start_server

KV_POSITIONS = 1088  # 68 blocks of 16 (one is padding): about two questions of ~530 positions
KV_BYTES_PER_POSITION = 1024  # the tiny model: 2 layers x 2 (keys, values) x 4 heads x 16 x 4 bytes


@pytest.fixture(scope="module")
def small_cache(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    process = start_server(tmp_path_factory.mktemp("small-kv"), tiny_checkpoint, max_running=16,
                           queue_size=32, max_tokens_limit=500,
                           kv_cache_bytes=(KV_POSITIONS // 16 + 1) * 16 * KV_BYTES_PER_POSITION)
    try:
        yield process
    finally:
        process.stop()


def test_many_long_questions_wait_for_room_and_answer_exactly(small_cache: Process, videos) -> None:
    url = small_cache.url
    with httpx.Client(base_url=url, timeout=120) as http:
        video = videos.fresh("long-for-kv.mp4", seconds=150, fps=2)
        upload = http.post("/v1/videos", files={"file": (video.name, video.read_bytes(), "video/mp4")})
        assert upload.status_code == 202, upload.text
        vid = wait_ready_video(http, upload.json()["id"])["id"]
        assert http.get("/v1/models").json()["data"][0]["llamavid"]["kv_positions"] == KV_POSITIONS

        def ask(i: int) -> dict:
            reply = http.post("/v1/ask", json={"video_id": vid, "question": f"What happens, part {i}?",
                                                "max_tokens": 60 + 3 * i})
            assert reply.status_code == 200, reply.text
            return reply.json()

        alone = [ask(i) for i in range(16)]
        assert all(a["usage"]["prompt_tokens"] > 400 for a in alone)
        before = scrape(url)
        usage, busy = [], threading.Event()

        def watch() -> None:
            while not busy.is_set():
                usage.append(scrape(url)["llamavid_kv_cache_usage_perc"])

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            with ThreadPoolExecutor(16) as pool:
                together = list(pool.map(ask, range(16)))
        finally:
            busy.set()
            watcher.join()
    assert [t["answer"] for t in together] == [a["answer"] for a in alone]
    assert [t["finish_reason"] for t in together] == [a["finish_reason"] for a in alone]
    after = scrape(url)
    assert before.delta(after, ("llamavid_request_success_total", {"finished_reason": "error"})) == 0
    assert max(usage) <= 1.0 and max(usage) > 0.5
    assert after["llamavid_num_requests_running"] == 0 and after["llamavid_kv_cache_usage_perc"] == 0


def test_a_video_longer_than_the_cache_is_thinned_to_fit_it(small_cache: Process, videos) -> None:
    with httpx.Client(base_url=small_cache.url, timeout=120) as http:
        video = videos.fresh("too-long-for-kv.mp4", seconds=300, fps=2)
        upload = http.post("/v1/videos", files={"file": (video.name, video.read_bytes(), "video/mp4")},
                           data={"fps": "2"})
        vid = wait_ready_video(http, upload.json()["id"])["id"]
        reply = http.post("/v1/ask", json={"video_id": vid, "question": "And then?", "max_tokens": 500})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        # 600 frames x 2 tokens do not fit 1088 positions, of which the answer keeps a quarter (272):
        # as many frames as fit the other 816, and not one fewer
        budget = KV_POSITIONS - KV_POSITIONS // 4
        assert body["frames_total"] == 600 and body["usage"]["visual_tokens"] == 2 * body["frames_used"]
        assert budget - 2 < body["usage"]["prompt_tokens"] <= budget
        assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] <= KV_POSITIONS
        # the text alone overflows the cache: no frame can fit, and the API says so before queueing
        refused = http.post("/v1/ask", json={"video_id": vid, "question": "why " * 1200})
    assert_api_error(refused, 400, "do not fit", f"KV cache of {KV_POSITIONS} positions",
                     code="context_length_exceeded")
