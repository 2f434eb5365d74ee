"""The two Redis roles of a split deployment, and the check that the queue's Redis keeps its keys.

* **queue** (``LLAMAVID_REDIS_URL``): job streams, events, leases, worker cards, video records and
  uploaded media: state whose loss is a lost request. Run it with ``maxmemory-policy noeviction``
  (a full Redis then refuses writes, which the service answers with 503) and, to survive a restart,
  AOF.
* **cache** (``LLAMAVID_CACHE_REDIS_URL``, optional): the feature blobs and their manifests, about
  2.6 GB per hour of video at 1 fps in fp16; any of them can be recomputed, so ``allkeys-lru``.

Unset, or the same URL, the cache is the queue's Redis (one connection): fine for small setups, with
a startup warning when that Redis evicts.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ...settings import Settings
from .outage import connect

log = logging.getLogger(__name__)

CHECK_SECONDS = 2.0
EVICTING_POLICIES = frozenset({"allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-lfu",
                               "volatile-random", "volatile-ttl"})


def connect_roles(settings: Settings) -> tuple[Redis, Redis]:
    """(queue Redis, cache Redis); the same client when there is one URL."""
    if not settings.redis_url:
        raise ValueError("a split deployment needs LLAMAVID_REDIS_URL")
    queue = connect(settings.redis_url)
    if not settings.cache_redis_url or settings.cache_redis_url == settings.redis_url:
        return queue, queue
    return queue, connect(settings.cache_redis_url)


def display_url(url: str | None) -> str:
    """``url`` for a log line: a password in it is replaced by ``***``."""
    if not url:
        return "-"
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


async def close_roles(queue: Redis, cache: Redis) -> None:
    await queue.aclose()
    if cache is not queue:
        await cache.aclose()


async def warn_if_evicting(redis: Redis) -> str | None:
    """Warn (a log line) when the queue Redis may evict keys; returns its maxmemory-policy, or None
    when it cannot be read (CONFIG disabled or renamed, as on many managed services; Redis down)."""
    try:  # bounded: a Redis that is down must not hold up startup (the service answers 503 meanwhile)
        reply = await asyncio.wait_for(redis.config_get("maxmemory-policy"), CHECK_SECONDS)
    except (RedisError, OSError, TimeoutError) as exc:
        log.info("could not read the queue Redis's maxmemory-policy (%s: %s); it should be noeviction",
                 type(exc).__name__, exc)
        return None
    policy = next(iter(reply.values()), None) if reply else None
    policy = policy.decode() if isinstance(policy, bytes) else policy
    if policy in EVICTING_POLICIES:
        log.warning("the queue Redis evicts keys (maxmemory-policy %s): under memory pressure it can drop queued "
                    "jobs and job state, i.e. lose requests. Run it with noeviction and give the feature cache "
                    "its own Redis (LLAMAVID_CACHE_REDIS_URL, allkeys-lru)", policy)
    return policy
