"""Each fault the operator's fault-testing found, injected for real, with the invariants checked after it."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.redis.conftest import Deployment, PrivateRedis, start_deployment, wait_for
from tests.server.live import scrape
from tests.serving import start_server

from .conftest import QUESTION, Outcome, assert_settled, reference, stream_answer

LONG = 1900  # tokens: a few seconds of the tiny model, long enough to fault in the middle


@pytest.fixture
def split(redis_available, private_redis: PrivateRedis, tiny_checkpoint: Path, tmp_path: Path):
    """One API and one worker on a private Redis, a short visibility timeout."""
    d = start_deployment(tmp_path, tiny_checkpoint, workers=1, redis_url=private_redis.url,
                         visibility_timeout=2, max_tokens_limit=LONG)
    try:
        yield d
    finally:
        d.stop()


def burst(url: str, count: int, max_tokens: int = 24) -> list[Outcome]:
    body = {"messages": QUESTION, "max_tokens": max_tokens, "temperature": 0}
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: stream_answer(url, body, timeout=60), range(count)))


def test_a_fresh_server_finishes_its_first_burst(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Fault 1, embedded: eight questions at once to a process that has answered none yet."""
    server = start_server(tmp_path, tiny_checkpoint)
    try:
        outcomes = burst(server.url, 8)
        assert [o.end for o in outcomes] == ["done"] * 8, [o.error for o in outcomes]
        assert len({o.text for o in outcomes}) == 1  # the same greedy answer, eight times
        wait_for(lambda: scrape(server.url)["llamavid_num_requests_running"] == 0, 10,
                 "the gauge to return to 0")
    finally:
        server.stop()


def test_a_fresh_worker_finishes_its_first_burst(split: Deployment) -> None:
    """Fault 1, split."""
    outcomes = burst(split.url, 8)
    assert [o.end for o in outcomes] == ["done"] * 8, [o.error for o in outcomes]
    assert len({o.text for o in outcomes}) == 1
    assert_settled(split)


def test_a_redis_restart_mid_stream_ends_every_stream(split: Deployment, private_redis: PrivateRedis) -> None:
    """Fault 2: Redis stops for a second, mid-answer, and comes back empty; ten times. Every stream
    completes with the fault-free text, or ends with a clean error that is not its deadline."""
    expected = reference(split, LONG)
    assert len(expected) > 500
    results = []
    for _ in range(10):
        restarted: list[float] = []

        def restart_once(text: str) -> None:
            if not restarted and len(text) > 100:
                restarted.append(0.0)
                private_redis.stop()
                time.sleep(1.0)
                private_redis.start()
                restarted[0] = time.monotonic()

        out = stream_answer(split.url, {"messages": QUESTION, "max_tokens": LONG, "temperature": 0},
                            timeout=60, on_text=restart_once)
        assert restarted, "the stream ended before the fault was injected"
        results.append(out)
        assert out.end in ("done", "error"), f"a stream hung after the restart: {len(out.text)} characters"
        assert expected.startswith(out.text), "the client received text that is not the answer's"
        if out.end == "done":
            assert out.text == expected
        else:
            # a clean error naming the outage, not the deadline of a stream that waited in vain
            assert out.error["type"] and out.error["message"], out.error
            assert out.error.get("code") != "timeout", out.error
        split.wait_workers(1)
    assert sum(o.end == "done" for o in results) >= 1, [o.error for o in results]
    assert_settled(split)


def test_a_worker_killed_mid_extraction_is_taken_over_without_recomputing(
        redis_available, private_redis: PrivateRedis, tiny_checkpoint: Path, tmp_path: Path,
        make_video) -> None:
    """Fault 3: two workers extract one video together, range by range; the one that owns the
    extraction is SIGKILLed at 40 %. The survivor reclaims the job with no question asked, resumes
    the dead worker's range from its last cached chunk, and encodes no frame twice."""
    d = start_deployment(tmp_path, tiny_checkpoint, workers=2, redis_url=private_redis.url,
                         visibility_timeout=2, encode_batch=2, max_frames=400, extract_range_frames=50)
    try:
        video = make_video(seconds=40, fps=10)
        upload = httpx.post(d.url + "/v1/videos", files={"file": ("v.mp4", video, "video/mp4")},
                            data={"fps": "8"}, timeout=30)
        assert upload.status_code == 202, upload.text
        vid, total = upload.json()["id"], upload.json()["frames_total"]
        assert total >= 200

        def progress() -> dict:
            return httpx.get(f"{d.url}/v1/videos/{vid}", timeout=5).json()

        wait_for(lambda: progress()["frames_done"] >= 0.4 * total, 60, "40 % of the extraction",
                 interval=0.01)
        victim = d.extraction_owner()
        survivor = next(w for w in d.workers if w is not victim)
        assert all(w.metric("llamavid_extraction_ranges_total", how="fresh") > 0 for w in d.workers), \
            "the two workers did not share the extraction"
        victim.process.kill()
        record = wait_for(lambda: (p := progress())["status"] == "ready" and p, 60, "the survivor to finish")
        assert record["frames_done"] == total
        assert len(list(d.redis.scan_iter(match=f"{d.namespace}:v*:f:*", count=1000))) == total
        assert survivor.metric("llamavid_frames_recomputed_total") == 0
        assert survivor.metric("llamavid_extraction_ranges_total", how="resumed") >= 1
        assert "reclaimed videos job" in survivor.process.output()
        assert not list(d.redis.scan_iter(match=d.key("ranges", "*"))), "the range board was left behind"
        assert_settled(d)
    finally:
        d.stop()


def test_questions_routed_to_a_worker_that_hangs_are_adopted(
        redis_available, private_redis: PrivateRedis, tiny_checkpoint: Path, tmp_path: Path,
        make_video) -> None:
    """Fault 4: the worker that owns a video hangs (SIGSTOP) just as questions about it are routed
    to its own stream. Once its advertisement lapses, the other worker adopts the questions (or
    reclaims the one the hung worker's blocked read had taken) and answers them from the shared
    cache; every answer is the fault-free one. When the hung worker wakes up, it serves again."""
    d = start_deployment(tmp_path, tiny_checkpoint, workers=2, redis_url=private_redis.url,
                         visibility_timeout=2)
    try:
        upload = httpx.post(d.url + "/v1/videos", files={"file": ("v.mp4", make_video(seconds=3), "video/mp4")},
                            timeout=30)
        vid = upload.json()["id"]
        wait_for(lambda: httpx.get(f"{d.url}/v1/videos/{vid}").json()["status"] == "ready", 60, "the extraction")
        owner = next(w for w in d.workers if w.metric("llamavid_frames_decoded_total") > 0)
        survivor = next(w for w in d.workers if w is not owner)
        body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": vid}},
                                                          {"type": "text", "text": "What happens?"}]}],
                "max_tokens": 24, "temperature": 0}
        expected = stream_answer(d.url, body)
        assert expected.end == "done"
        routed = d.api_metric("llamavid_route_total", queue="questions", reason="affine")
        owner.process.proc.send_signal(signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(3) as pool:
                outcomes = list(pool.map(lambda _: stream_answer(d.url, body, timeout=60), range(3)))
            assert [o.end for o in outcomes] == ["done"] * 3, [o.error for o in outcomes]
            assert all(o.text == expected.text for o in outcomes)
            assert d.api_metric("llamavid_route_total", queue="questions", reason="affine") == routed + 3
            assert survivor.metric("llamavid_request_success_total") == 3
            assert survivor.metric("llamavid_question_features_total", source="cold") >= 1
            assert survivor.metric("llamavid_frames_decoded_total") == 0  # read from the cache, never decoded
            assert "adopted questions job" in survivor.process.output()
        finally:
            owner.process.proc.send_signal(signal.SIGCONT)
        d.wait_workers(2)
        assert stream_answer(d.url, body).text == expected.text
        assert_settled(d)
    finally:
        d.stop()


def test_dead_entries_leave_the_video_queue_bound(
        redis_available, private_redis: PrivateRedis, tiny_checkpoint: Path, tmp_path: Path,
        make_video) -> None:
    """Fault 3, the bound: a dead worker's video job must not keep new uploads out."""
    d = start_deployment(tmp_path, tiny_checkpoint, workers=1, redis_url=private_redis.url,
                         visibility_timeout=1, video_queue_size=1, encode_batch=1, max_frames=400)
    try:
        first = httpx.post(d.url + "/v1/videos",
                           files={"file": ("a.mp4", make_video(seconds=40), "video/mp4")},
                           data={"fps": "8"}, timeout=30)
        assert first.status_code == 202
        wait_for(lambda: httpx.get(f"{d.url}/v1/videos/{first.json()['id']}").json()["frames_done"] > 0, 30,
                 "the extraction to start", interval=0.01)
        d.workers[0].process.kill()
        second = lambda: httpx.post(d.url + "/v1/videos", timeout=30,  # noqa: E731
                                    files={"file": ("b.mp4", make_video(seconds=2), "video/mp4")})
        # Without a worker nothing acknowledges the first job; once its entry has been idle for the
        # visibility timeout it is dead and stops counting against the bound of one.
        wait_for(lambda: second().status_code == 202, 10, "the dead entry to stop counting", interval=0.5)
    finally:
        d.stop()


def test_a_job_nobody_relays_is_cancelled(redis_available, private_redis: PrivateRedis, slow_checkpoint: Path,
                                          tmp_path: Path) -> None:
    """Fault 5: the API is SIGKILLed mid-stream; the worker stops the orphaned generation within
    seconds (lease time + grace) instead of generating all of it for nobody."""
    d = start_deployment(tmp_path, slow_checkpoint, workers=1, redis_url=private_redis.url,
                         max_tokens_limit=LONG)
    try:
        body = {"messages": QUESTION, "max_tokens": LONG, "temperature": 0}
        threading.Thread(target=stream_answer, args=(d.url, body), daemon=True).start()
        wait_for(lambda: d.total("llamavid_generation_tokens_total") >= 5, 60, "the answer to start")
        d.api.kill()
        aborted = wait_for(
            lambda: d.total("llamavid_request_success_total", finished_reason="abort") == 1 or None,
            30, "the worker to stop the orphaned job")
        assert aborted
        assert d.total("llamavid_generation_tokens_total") < LONG / 4
        assert "nobody has relayed it" in d.workers[0].process.output()
    finally:
        d.stop()


def test_an_outage_is_a_503_that_names_redis(split: Deployment, private_redis: PrivateRedis,
                                             make_video) -> None:
    """Fault 6: with Redis down every route answers 503 with Retry-After and says why; after it is
    back, they work again."""
    private_redis.stop()
    calls = {
        "GET /v1/videos/{id}": lambda: httpx.get(split.url + "/v1/videos/vid-" + "0" * 24, timeout=30),
        "POST /v1/videos": lambda: httpx.post(split.url + "/v1/videos", timeout=30,
                                              files={"file": ("a.mp4", make_video(seconds=2), "video/mp4")}),
        "DELETE /v1/videos/{id}": lambda: httpx.delete(split.url + "/v1/videos/vid-" + "0" * 24, timeout=30),
        "POST /v1/chat/completions": lambda: httpx.post(split.url + "/v1/chat/completions", timeout=30,
                                                        json={"messages": QUESTION, "max_tokens": 2}),
    }
    for name, call in calls.items():
        reply = call()
        assert reply.status_code == 503, f"{name}: {reply.status_code} {reply.text}"
        error = reply.json()["error"]
        assert error["code"] == "redis_unavailable" and "Redis" in error["message"], (name, error)
        assert int(reply.headers["retry-after"]) > 0
    private_redis.start()
    split.wait_workers(1)
    assert httpx.post(split.url + "/v1/chat/completions", timeout=60,
                      json={"messages": QUESTION, "max_tokens": 2}).status_code == 200


def test_sigterm_with_redis_down_exits_promptly(split: Deployment, private_redis: PrivateRedis) -> None:
    """Fault 9: shutdown is bounded even when Redis is unreachable (jobs are left for reclaim)."""
    private_redis.stop()
    worker = split.workers[0].process
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(timeout=20) == 0, worker.output()[-2000:]


def test_a_request_whose_events_cannot_be_delivered_stops_at_its_budget(
        redis_available, private_redis: PrivateRedis, slow_checkpoint: Path, tmp_path: Path) -> None:
    """Fault 4: Redis goes down mid-answer, so the worker cannot send the answer's events. Decoding
    stops at ``max_tokens`` (the batched decoder frees the slot there) and the worker goes idle
    instead of stepping on; once Redis is back the stream completes with the fault-free text."""
    d = start_deployment(tmp_path, slow_checkpoint, workers=1, redis_url=private_redis.url,
                         visibility_timeout=30)
    try:
        budget = 120
        expected = reference(d, budget)
        before = d.total("llamavid_generation_tokens_total")
        worker = d.workers[0]
        down: list[bool] = []

        def idle() -> bool:
            cpu = worker.metric("process_cpu_seconds_total")
            time.sleep(1.0)
            return worker.metric("process_cpu_seconds_total") - cpu < 0.25

        def outage(text: str) -> None:
            if not down and text:
                down.append(True)
                private_redis.stop()
                wait_for(idle, 60, "the worker to stop decoding while its events cannot be sent", interval=0)
                private_redis.start()

        out = stream_answer(d.url, {"messages": QUESTION, "max_tokens": budget, "temperature": 0},
                            on_text=outage)
        assert down and out.end == "done" and out.text == expected, (out.end, out.error)
        assert d.total("llamavid_generation_tokens_total") - before == budget
        assert_settled(d)
    finally:
        d.stop()
