"""The startup warning when the queue Redis may evict keys (an evicted job key is a lost request),
against real ``redis-server`` processes: an evicting policy, ``noeviction``, and CONFIG disabled."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from server.engine.redis.outage import connect
from server.engine.redis.roles import connect_roles, display_url, warn_if_evicting
from server.settings import Settings
from tests.needs import missing
from tests.serving import free_port

from .conftest import PrivateRedis


@contextmanager
def redis_server(tmp: Path, *args: str) -> Iterator[PrivateRedis]:
    """A private ``redis-server`` started with ``args``, stopped afterwards."""
    if shutil.which("redis-server") is None:
        missing("redis-server is not installed")
    server = PrivateRedis(free_port(), tmp / "redis-server.log", args=args)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def policy_of(port: int) -> str | None:
    async def check() -> str | None:
        client = connect(f"redis://127.0.0.1:{port}/0")
        try:
            return await warn_if_evicting(client)
        finally:
            await client.aclose()
    return asyncio.run(check())


@pytest.mark.parametrize("policy, warns", [("allkeys-lru", True), ("volatile-ttl", True), ("noeviction", False)])
def test_an_evicting_queue_redis_is_warned_about(tmp_path, caplog, policy: str, warns: bool) -> None:
    with redis_server(tmp_path, "--maxmemory-policy", policy) as server, \
            caplog.at_level(logging.INFO, logger="server.engine.redis.roles"):
        assert policy_of(server.port) == policy
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warns:
        assert len(warnings) == 1 and f"maxmemory-policy {policy}" in warnings[0], warnings
        assert "LLAMAVID_CACHE_REDIS_URL" in warnings[0]
    else:
        assert warnings == []


def test_a_redis_without_config_is_tolerated(tmp_path, caplog) -> None:
    with redis_server(tmp_path, "--rename-command", "CONFIG", '""') as server, \
            caplog.at_level(logging.INFO, logger="server.engine.redis.roles"):
        assert policy_of(server.port) is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("maxmemory-policy" in r.getMessage() for r in caplog.records)


def test_one_url_is_one_connection_two_urls_are_two() -> None:
    async def roles(**urls: str) -> bool:
        queue, cache = connect_roles(Settings(**urls))
        same = queue is cache
        await queue.aclose()
        await cache.aclose()
        return same

    url = "redis://127.0.0.1:6379/14"
    assert asyncio.run(roles(redis_url=url))
    assert asyncio.run(roles(redis_url=url, cache_redis_url=url))
    assert not asyncio.run(roles(redis_url=url, cache_redis_url="redis://127.0.0.1:6379/15"))


def test_log_lines_do_not_show_redis_passwords() -> None:
    assert display_url("redis://:s3cret@queue:6379/0") == "redis://:***@queue:6379/0"
    assert display_url("rediss://user:s3cret@cache:6380/1") == "rediss://user:***@cache:6380/1"
    assert display_url("redis://127.0.0.1:6379/14") == "redis://127.0.0.1:6379/14"
