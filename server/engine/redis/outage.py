"""A Redis that cannot be reached is a 503 naming the backend, never a 500.

``redis_backend`` wraps every public method of a class that talks to Redis, so a connection or
timeout error leaves it as ``EngineUnavailable`` (which the API answers with 503 and
Retry-After, and the worker's loops retry like any other failure).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..protocol import EngineUnavailable

C = TypeVar("C", bound=type)
OUTAGES = (RedisConnectionError, RedisTimeoutError, ConnectionError)


def connect(url: str) -> Redis:
    """A client that gives up on a dead Redis within a second: redis-py's default retries with a
    backoff of up to 10 s, which would hold a command (and the answer behind it) that long after
    Redis is back. The service retries at its own level (every loop, every emit), so a short
    reconnect attempt here is enough."""
    retry = Retry(ExponentialBackoff(cap=0.25, base=0.05), retries=3)
    return Redis.from_url(url, socket_timeout=30, socket_connect_timeout=2, health_check_interval=10,
                          retry=retry)


def unavailable(exc: BaseException) -> EngineUnavailable:
    return EngineUnavailable(f"the queue backend (Redis) is unreachable: {type(exc).__name__}: {exc}",
                             code="redis_unavailable")


def _coroutine(fn: Callable) -> Callable:
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except OUTAGES as exc:
            raise unavailable(exc) from exc
    return wrapper


def _generator(fn: Callable) -> Callable:
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            async for item in fn(*args, **kwargs):
                yield item
        except OUTAGES as exc:
            raise unavailable(exc) from exc
    return wrapper


def redis_backend(cls: C) -> C:
    for name, member in list(vars(cls).items()):
        if name.startswith("_"):
            continue
        if inspect.iscoroutinefunction(member):
            setattr(cls, name, _coroutine(member))
        elif inspect.isasyncgenfunction(member):
            setattr(cls, name, _generator(member))
    return cls
