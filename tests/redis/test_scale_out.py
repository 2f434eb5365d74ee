"""One API and two workers on the real Redis, shared by tests that leave the deployment working:
concurrency, per-request keys, video extraction and progress, the feature cache across workers,
and cancellation when the client goes away."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from .conftest import Deployment, wait_for

QUESTION = [{"role": "user", "content": "What happens in this clip?"}]


def request_id(completion_id: str) -> str:
    """The API's request id behind a ``chatcmpl-<hex>`` id (``req-<hex>``)."""
    assert completion_id.startswith("chatcmpl-"), completion_id
    return "req-" + completion_id.removeprefix("chatcmpl-")


def video_question(video_id: str, text: str = "What is shown?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "video_url", "video_url": {"url": video_id}}]}]


def upload(d: Deployment, data: bytes, **fields: object) -> dict:
    reply = httpx.post(d.url + "/v1/videos", files={"file": ("clip.mp4", data, "video/mp4")},
                       data={k: str(v) for k, v in fields.items()}, timeout=30)
    assert reply.status_code == 202, reply.text
    return reply.json()


def video_status(d: Deployment, video_id: str) -> dict:
    reply = httpx.get(f"{d.url}/v1/videos/{video_id}", timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()


def wait_video_ready(d: Deployment, video_id: str, timeout: float = 60) -> dict:
    def ready() -> dict | None:
        status = video_status(d, video_id)
        assert status["status"] != "failed", status
        return status if status["status"] == "ready" else None

    return wait_for(ready, timeout, f"video {video_id} to be extracted")


def per_worker(d: Deployment, name: str, **labels: str) -> list[float]:
    return [w.metric(name, **labels) for w in d.workers]


def wait_idle(d: Deployment, timeout: float = 30) -> None:
    """No question running or waiting on any worker, and the question stream drained."""
    def idle() -> bool:
        busy = d.total("llamavid_num_requests_running") + d.total("llamavid_num_requests_waiting")
        return busy == 0 and d.queued("questions") == 0

    wait_for(idle, timeout, "the workers to go idle")


def test_twenty_concurrent_questions_are_all_answered(deployment: Deployment) -> None:
    d = deployment
    before = per_worker(d, "llamavid_request_success_total")
    replies = d.ask_many(20, max_tokens=48)

    assert len({r.id for r in replies}) == 20
    for reply in replies:
        assert reply.choices[0].finish_reason in ("stop", "length"), reply
        assert reply.usage.completion_tokens > 0
        if reply.choices[0].finish_reason == "length":
            assert reply.usage.completion_tokens == 48
    wait_idle(d)
    served = [a - b for a, b in zip(per_worker(d, "llamavid_request_success_total"), before)]
    assert sum(served) == 20, served
    assert all(n > 0 for n in served), f"one worker answered everything: {served}"


def test_per_request_keys_expire(deployment: Deployment) -> None:
    d = deployment
    reply = d.openai(timeout=60).chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8,
                                                         temperature=0)
    rid = request_id(reply.id)
    events = d.key("events", rid)
    assert d.redis.exists(events), "the request left no event stream"
    assert d.redis.ttl(events) > 0
    assert d.redis.ttl(d.key("attempt", rid)) > 0
    assert int(d.redis.get(d.key("attempt", rid))) == 1
    # The job entry is acknowledged and deleted once answered: nothing pending, nothing left behind.
    wait_for(lambda: d.redis.xlen(d.key("jobs", "questions")) == 0, 10, "the job to be deleted")
    assert d.redis.xpending(d.key("jobs", "questions"), "workers")["pending"] == 0
    # And no key of the namespace lives forever, apart from the job streams themselves.
    for key in d.redis.scan_iter(match=d.key("*"), count=1000):
        name = key.decode()
        if name.startswith(d.key("jobs", "")):  # the shared streams and the workers' own
            continue
        assert d.redis.ttl(key) != -1, f"{name} has no TTL"  # (-2: it expired since the scan, e.g. a lease)


def test_uploaded_video_is_extracted_by_a_worker(deployment: Deployment, make_video) -> None:
    d = deployment
    decoded_before = d.total("llamavid_frames_decoded_total")
    record = upload(d, make_video(seconds=20, fps=10), fps=8)
    assert record["status"] == "queued"
    total = record["frames_total"]
    assert total == 200 and record["frames_done"] == 0  # every frame: the official 1-in-round(10/8) rule
    seen = [(record["status"], record["frames_done"])]
    deadline = time.monotonic() + 60
    while seen[-1][0] != "ready":
        assert time.monotonic() < deadline, f"not extracted in time: {seen[-5:]}"
        status = video_status(d, record["id"])
        assert status["status"] != "failed", status
        assert status["frames_total"] == total
        if (status["status"], status["frames_done"]) != seen[-1]:
            seen.append((status["status"], status["frames_done"]))
        time.sleep(0.01)

    order = {"queued": 0, "extracting": 1, "ready": 2}
    statuses = [s for s, _ in seen]
    assert statuses == sorted(statuses, key=order.__getitem__), seen
    assert "extracting" in statuses, f"never saw the video extracting: {seen}"
    done = [n for s, n in seen if s == "extracting"]
    assert done == sorted(done), f"progress went backwards: {seen}"
    assert any(0 < n < total for n in done), f"no intermediate progress: {seen}"
    final = video_status(d, record["id"])
    assert final["frames_done"] == final["frames_total"] == total and final["progress"] == 1.0
    assert len(final["timestamps"]) == total
    assert d.total("llamavid_frames_decoded_total") - decoded_before == total


def test_question_while_extracting_streams_progress(deployment: Deployment, make_video) -> None:
    d = deployment
    record = upload(d, make_video(seconds=40, fps=10), fps=8)  # 400 frames: extraction takes a while
    stream = d.openai(timeout=120).chat.completions.create(
        model="tiny", messages=video_question(record["id"]), max_tokens=16, temperature=0, stream=True)
    progress, text, finish = [], "", None
    for chunk in stream:
        extension = (chunk.model_extra or {}).get("llamavid")
        if extension is not None and extension.get("type") == "progress":
            assert not chunk.choices  # progress rides on chunks of its own
            progress.append(extension)
            continue
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert progress, "no progress chunk while the video was being extracted"
    total = record["frames_total"]
    assert all(p["video_id"] == record["id"] and p["frames_total"] == total for p in progress), progress
    assert any(p["status"] == "extracting" and p["frames_done"] < total for p in progress), progress
    assert finish in ("stop", "length") and text
    assert video_status(d, record["id"])["status"] == "ready"


def test_a_videos_jobs_go_to_the_worker_that_holds_its_features(deployment: Deployment, make_video) -> None:
    """Cache-affine routing: the extraction and every question about the video go to one worker
    (the video's owner among the live workers), which answers from its hot tier: nothing is read
    from the shared cache, nothing decoded again."""
    d = deployment
    decoded = lambda: per_worker(d, "llamavid_frames_decoded_total")  # noqa: E731
    routed = lambda queue: d.api_metric("llamavid_route_total", queue=queue, reason="affine")  # noqa: E731
    before, videos_routed, questions_routed = decoded(), routed("videos"), routed("questions")
    record = upload(d, make_video(seconds=6, fps=10), fps=4)
    wait_video_ready(d, record["id"])
    extracted = [a - b for a, b in zip(decoded(), before)]
    assert sorted(extracted) == [0, record["frames_total"]], extracted
    owner = extracted.index(record["frames_total"])
    assert routed("videos") == videos_routed + 1

    def sources(worker: int) -> dict[str, float]:
        return {s: d.workers[worker].metric("llamavid_question_features_total", source=s)
                for s in ("hot", "cold", "extracted")}

    answered = per_worker(d, "llamavid_request_success_total")
    owner_sources, other_sources = sources(owner), sources(1 - owner)
    cold_bytes = per_worker(d, "llamavid_feature_cache_bytes_read_total", tier="cold")
    client = d.openai(timeout=60)
    for i in range(4):
        reply = client.chat.completions.create(model="tiny", messages=video_question(record["id"], f"Question {i}?"),
                                               max_tokens=8, temperature=0)
        assert reply.usage.model_extra["visual_tokens"] == 2 * record["frames_total"]
    wait_idle(d)
    served = [a - b for a, b in zip(per_worker(d, "llamavid_request_success_total"), answered)]
    assert served[owner] == 4 and served[1 - owner] == 0, served
    assert routed("questions") == questions_routed + 4
    assert sources(owner) == {**owner_sources, "hot": owner_sources["hot"] + 4}
    assert sources(1 - owner) == other_sources
    assert per_worker(d, "llamavid_feature_cache_bytes_read_total", tier="cold") == cold_bytes
    assert decoded()[owner] - before[owner] == record["frames_total"], "a question decoded frames again"


def test_client_disconnect_cancels_the_job(deployment: Deployment) -> None:
    d = deployment
    wait_idle(d)
    aborted = d.total("llamavid_request_success_total", finished_reason="abort")
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 1900, "temperature": 0, "stream": True}
    with httpx.stream("POST", d.url + "/v1/chat/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        chunks = 0
        for line in reply.iter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                data = json.loads(line[5:])
                rid = request_id(data["id"])
                chunks += 1
                if chunks >= 5:
                    break
    # The connection is closed: the API sets the cancel flag and the worker stops generating.
    wait_for(lambda: d.redis.exists(d.key("cancel", rid)), 10, "the cancel flag")
    assert d.redis.ttl(d.key("cancel", rid)) > 0
    wait_for(lambda: d.total("llamavid_request_success_total", finished_reason="abort") == aborted + 1, 15,
             "the worker to abort the request")
    wait_for(lambda: d.total("llamavid_num_requests_running") == 0, 10, "the running gauge to return to 0")
    events = d.redis.xrange(d.key("events", rid))
    deltas = [e for _, e in events if json.loads(e[b"event"])["type"] == "delta"]
    assert len(deltas) < 1900, "the worker generated the whole answer"
    assert not any(json.loads(e[b"event"])["type"] == "done" for _, e in events)


def test_client_disconnect_cancels_a_non_streaming_job(deployment: Deployment) -> None:
    d = deployment
    wait_idle(d)
    aborted = d.total("llamavid_request_success_total", finished_reason="abort")
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 1900, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(d.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=1.0))
    wait_for(lambda: d.total("llamavid_request_success_total", finished_reason="abort") == aborted + 1, 5,
             "the worker to abort the abandoned request")
    wait_for(lambda: d.total("llamavid_num_requests_running") == 0, 10, "the running gauge to return to 0")


def test_n_answers_and_logprobs_cross_redis(deployment: Deployment) -> None:
    """Several answers of one request, with their log-probabilities, relayed per answer: streamed
    and whole give the same tokens, and answer 0 is the n=1 answer."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{deployment.url}/v1", api_key="none", max_retries=0)
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Name three colours."}], max_tokens=6,
                  temperature=1.0, seed=3, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(n=2, **kwargs)
    assert [c.index for c in whole.choices] == [0, 1]
    for choice in whole.choices:
        raw = b"".join(bytes(e.bytes) for e in choice.logprobs.content)
        assert raw.decode("utf-8", errors="replace") == choice.message.content
    tokens: dict[int, list[str]] = {0: [], 1: []}
    for chunk in client.chat.completions.create(n=2, stream=True, **kwargs):
        for choice in chunk.choices:
            tokens[choice.index] += [e.token for e in (choice.logprobs.content if choice.logprobs else [])]
    assert [tokens[i] for i in (0, 1)] == [[e.token for e in c.logprobs.content] for c in whole.choices]
    assert client.chat.completions.create(**kwargs).choices[0].message.content == whole.choices[0].message.content
