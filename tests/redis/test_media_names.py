"""vLLM media uuids in both deployments' media stores: a name for media, kept as long as media."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from server.engine.jobs import MediaRef, QuestionJob, Turn
from server.engine.redis.storage import RedisMediaStore
from server.engine.storage import DiskMediaStore


@pytest.fixture(params=["disk", "redis"])
def store(request, tmp_path: Path, redis_client: aioredis.Redis, namespace: str):
    if request.param == "disk":
        return DiskMediaStore(tmp_path, 1 << 20)
    return RedisMediaStore(redis_client, namespace, ttl=60)


async def test_names_and_presence(store) -> None:
    assert await store.named("sku-1234") is None
    await store.name("sku-1234", '{"kind": "image", "digest": "ab"}')
    assert await store.named("sku-1234") == '{"kind": "image", "digest": "ab"}'
    await store.name("sku-1234", '{"kind": "image", "digest": "cd"}')  # the latest naming wins
    assert await store.named("sku-1234") == '{"kind": "image", "digest": "cd"}'
    assert not await store.has("ab" * 32)
    await store.put("ab" * 32, b"bytes")
    assert await store.has("ab" * 32)
    await store.delete("ab" * 32)
    assert not await store.has("ab" * 32)


async def test_a_redis_name_expires_with_the_media_ttl(redis_client: aioredis.Redis, namespace: str) -> None:
    store = RedisMediaStore(redis_client, namespace, ttl=60)
    await store.name("any text, even / and spaces", "{}")
    keys = [k async for k in redis_client.scan_iter(match=f"{namespace}:media-uuid:*")]
    assert len(keys) == 1 and 0 < await redis_client.ttl(keys[0]) <= 60


def test_a_job_with_several_media_routes_by_its_first_video() -> None:
    image, first, second = (MediaRef(kind=k, digest=d) for k, d in (("image", "i"), ("video", "v1"), ("video", "v2")))
    job = QuestionJob(request_id="r", messages=[Turn(role="user", content="q")], media=[image, first, second],
                      deadline=2e9)
    assert job.routing_digest == "v1"
    assert QuestionJob(request_id="r", messages=job.messages, media=image, deadline=2e9).routing_digest == "i"
    assert QuestionJob(request_id="r", messages=job.messages, deadline=2e9).routing_digest is None
