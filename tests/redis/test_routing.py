"""Cache-affine routing on a real Redis: where the API puts a job, and what happens to the streams
of workers that go away. Workers are advertised directly (the data a worker writes); the live
processes are exercised in test_scale_out.py and tests/faults."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import Counter

import pytest
import redis.asyncio as aioredis

from server.engine.jobs import MediaRef, QuestionJob, Sampling, Turn, VideoJob
from server.engine.protocol import QueueFull
from server.engine.redis.client import RedisEngine
from server.engine.redis.queue import QUESTIONS, VIDEOS, RedisJobQueue
from server.engine.redis.routing import owner
from server.metrics import LlamaVidMetrics
from server.settings import Settings

DIGESTS = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(3000)]  # fixed, like content digests


def test_owners_spread_evenly_and_move_only_to_a_new_worker() -> None:
    workers = [f"host-{i}" for i in range(4)]
    before = {d: owner(d, workers) for d in DIGESTS}
    assert before == {d: owner(d, list(reversed(workers))) for d in DIGESTS}  # the order is irrelevant
    shares = Counter(before.values())
    assert all(0.2 < n / len(DIGESTS) < 0.3 for n in shares.values()), shares
    after = {d: owner(d, [*workers, "host-4"]) for d in DIGESTS}
    moved = [d for d in DIGESTS if after[d] != before[d]]
    assert all(after[d] == "host-4" for d in moved)  # nothing moves between the old workers
    assert 0.15 < len(moved) / len(DIGESTS) < 0.25  # about 1/5 moves to the new one
    assert owner("x", []) is None


def engine(redis: aioredis.Redis, namespace: str, **settings: object) -> RedisEngine:
    return RedisEngine(redis, Settings(redis_namespace=namespace, **settings), LlamaVidMetrics())


async def advertise(queue: RedisJobQueue, worker: str, ttl: float = 30.0) -> None:
    streams = [queue.stream(q, worker) for q in (QUESTIONS, VIDEOS)]
    await queue.advertise(worker, json.dumps({"id": "tiny", "worker_id": worker}), ttl, own_streams=streams)


def question(digest: str | None) -> QuestionJob:
    media = MediaRef(kind="video", digest=digest, video_id="vid-1") if digest else None
    return QuestionJob(request_id=f"req-{uuid.uuid4().hex}", messages=[Turn(role="user", content="what?")],
                       media=media, deadline=2e9)


def routes(e: RedisEngine, queue: str) -> dict[str, float]:
    registry = e.metrics.registry
    return {reason: registry.get_sample_value("llamavid_route_total", {"queue": queue, "reason": reason})
            for reason in ("affine", "owner_busy", "owner_gone", "no_media", "shared")}


async def test_a_question_goes_to_its_videos_owner_until_its_queue_is_full(redis_client, namespace) -> None:
    e = engine(redis_client, namespace, affinity_queue_depth=2)
    queue = e.queue
    for worker in ("w-a", "w-b", "w-c"):
        await advertise(queue, worker)
    digest = DIGESTS[0]
    target = owner(digest, ["w-a", "w-b", "w-c"])
    placed = [await e._enqueue(QUESTIONS, question(digest).model_dump_json(), digest, affine_limit=2,
                               shared_limit=10) for _ in range(3)]
    assert [stream for stream, _ in placed] == [queue.stream(QUESTIONS, target)] * 2 + [queue.stream(QUESTIONS)]
    assert await redis_client.xlen(queue.stream(QUESTIONS, target)) == 2
    text = await e._enqueue(QUESTIONS, question(None).model_dump_json(), None, affine_limit=2, shared_limit=10)
    assert text[0] == queue.stream(QUESTIONS)
    assert routes(e, QUESTIONS) == {"affine": 2, "owner_busy": 1, "owner_gone": 0, "no_media": 1, "shared": 0}
    await e.close()


async def test_a_video_job_goes_to_the_owner_that_will_answer_its_questions(redis_client, namespace) -> None:
    e = engine(redis_client, namespace)
    for worker in ("w-a", "w-b"):
        await advertise(e.queue, worker)
    digest = DIGESTS[1]
    await e.extract(VideoJob(video_id="vid-1", digest=digest, sampling=Sampling()))
    await e.extract(VideoJob(video_id="vid-2", digest=digest, sampling=Sampling(fps=2)))  # the owner is busy
    target = owner(digest, ["w-a", "w-b"])
    assert await redis_client.xlen(e.queue.stream(VIDEOS, target)) == 1
    assert await redis_client.xlen(e.queue.stream(VIDEOS)) == 1
    assert routes(e, VIDEOS)["affine"] == 1 and routes(e, VIDEOS)["owner_busy"] == 1
    await e.close()


async def test_shared_routing_is_the_baseline(redis_client, namespace) -> None:
    e = engine(redis_client, namespace, routing="shared")
    await advertise(e.queue, "w-a")
    stream, _ = await e._enqueue(QUESTIONS, "{}", DIGESTS[2], affine_limit=8, shared_limit=8)
    assert stream == e.queue.stream(QUESTIONS) and routes(e, QUESTIONS)["shared"] == 1
    await e.close()


async def test_a_full_shared_queue_is_queue_full(redis_client, namespace) -> None:
    e = engine(redis_client, namespace, queue_size=1, max_running=1, affinity_queue_depth=1)
    await advertise(e.queue, "w-a")
    await e.queue.enqueue_to_worker(QUESTIONS, "w-a", "{}", limit=100)
    for _ in range(2):  # the owner's bound (1) is reached; the shared bound is 1 + 1 x 1 workers
        await e._enqueue(QUESTIONS, "{}", None, affine_limit=1, shared_limit=2)
    with pytest.raises(QueueFull):
        await e.ask(question(DIGESTS[3]))
    await e.close()


async def test_a_dead_workers_streams_take_no_job_and_go_once_empty(redis_client, namespace) -> None:
    queue = RedisJobQueue(redis_client, namespace)
    await advertise(queue, "w-dead", ttl=30)
    entry, status = await queue.enqueue_to_worker(QUESTIONS, "w-dead", "{}", limit=8)
    assert status == "ok" and entry
    assert not await queue.drop_worker_streams("w-dead", (QUESTIONS, VIDEOS))  # still live
    await queue.retire("w-dead")  # its advertisement is gone: it counts as dead
    assert await queue.routed_workers() == ([], ["w-dead"])
    assert await queue.enqueue_to_worker(QUESTIONS, "w-dead", "{}", limit=8) == (None, "gone")
    assert not await queue.drop_worker_streams("w-dead", (QUESTIONS, VIDEOS))  # a job is still in it
    # Another worker adopts the job (reads it from the dead worker's stream) and finishes it.
    stream = queue.stream(QUESTIONS, "w-dead")
    [(adopted_stream, adopted, _)] = await queue.read([stream], "w-other", count=8, block_ms=None, create=False)
    assert (adopted_stream, adopted) == (stream, entry)
    await queue.ack(stream, entry)
    assert await queue.drop_worker_streams("w-dead", (QUESTIONS, VIDEOS))
    assert not await redis_client.exists(stream, queue.stream(VIDEOS, "w-dead"))
    assert await queue.routed_workers() == ([], [])
    # A read of streams that were just deleted does not bring them back.
    assert await queue.read([stream], "w-other", count=8, block_ms=None, create=False) == []
    assert not await redis_client.exists(stream)
