"""Redis goes away and comes back empty (no persistence): the API reports not ready while it is
gone and recovers without a restart; the worker recreates its consumer groups."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from .conftest import Deployment, PrivateRedis, start_deployment, wait_for

QUESTION = [{"role": "user", "content": "Is anyone there?"}]


@pytest.fixture
def on_private_redis(redis_available, private_redis: PrivateRedis, tiny_checkpoint: Path,
                     tmp_path: Path) -> Iterator[Deployment]:
    d = start_deployment(tmp_path, tiny_checkpoint, workers=1, redis_url=private_redis.url)
    try:
        yield d
    finally:
        d.stop()


def ready_status(d: Deployment) -> int:
    try:
        return httpx.get(d.url + "/ready", timeout=5).status_code
    except httpx.HTTPError:
        return 0


def groups(d: Deployment, queue: str) -> list[str]:
    try:
        return [g["name"].decode() for g in d.redis.xinfo_groups(d.key("jobs", queue))]
    except redis.ResponseError:  # no such stream yet
        return []


def test_service_survives_a_redis_restart(on_private_redis: Deployment, private_redis: PrivateRedis) -> None:
    d = on_private_redis
    client = d.openai(timeout=60)
    first = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8, temperature=0)
    assert first.choices[0].finish_reason == "length"
    events = d.key("events", "req-" + first.id.removeprefix("chatcmpl-"))
    assert d.redis.exists(events)

    private_redis.stop()
    wait_for(lambda: ready_status(d) == 503, 5, "/ready to report 503 without Redis", interval=0.1)
    body = httpx.get(d.url + "/ready", timeout=5).json()
    assert body["status"] == "not_ready" and body["cache"] is False
    time.sleep(1.0)  # the worker notices too (its reads and heartbeats fail) and keeps retrying

    private_redis.start()  # same port, no data: streams, groups and worker cards are gone
    assert not d.redis.exists(events)
    wait_for(lambda: ready_status(d) == 200, 20, "/ready to recover after Redis came back", interval=0.2)
    assert all(w.alive for w in d.workers) and d.api.proc.poll() is None

    again = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8, temperature=0)
    assert again.choices[0].finish_reason == "length"
    assert again.choices[0].message.content == first.choices[0].message.content  # greedy: same answer
    assert "workers" in groups(d, "questions")
    wait_for(lambda: "workers" in groups(d, "videos"), 10, "the worker to recreate the videos group")
