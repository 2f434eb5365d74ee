"""Fixtures for the cache tests: a real Redis (never a mock) and a namespace per test.

The server is ``LLAMAVID_TEST_REDIS_URL`` (default redis://127.0.0.1:6379/0). Without one the
Redis tests are skipped locally and fail in CI (``CI`` set), where a missing Redis is a bug.
Every key a test writes lives under ``test:<uuid>`` and is deleted at teardown.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from cache.keys import FeatureKeys
from cache.redis import RedisFeatureStore
from tests.needs import missing

REDIS_URL = os.environ.get("LLAMAVID_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=False)
    try:
        await client.ping()
    except (RedisError, OSError) as error:
        await client.aclose()
        missing(f"no Redis at {REDIS_URL}: {error!r}")
    yield client
    await client.aclose()


@pytest.fixture(name="namespace")  # a distinct function name, so modules that import it can name locals "namespace"
async def namespace_fixture(redis_client: aioredis.Redis) -> AsyncIterator[str]:
    """A fresh namespace; every key under it is deleted after the test."""
    name = f"test:{uuid.uuid4().hex}"
    yield name
    pattern = FeatureKeys(name).namespace_pattern()
    leftovers = [key async for key in redis_client.scan_iter(match=pattern, count=1000)]
    if leftovers:
        await redis_client.unlink(*leftovers)


@pytest.fixture
def redis_store(redis_client: aioredis.Redis, namespace: str) -> RedisFeatureStore:
    """A float16 store on the test namespace, small chunks so chunking is exercised."""
    return RedisFeatureStore(redis_client, namespace=namespace, chunk_size=8)
