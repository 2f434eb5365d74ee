"""The shared ``MediaStore`` and ``VideoRegistry`` of a split deployment, on Redis.

Media bytes are split into 8 MiB parts (a Redis string tops out at 512 MiB, and big values
block the server while they are copied) under ``ns:media:<digest>:<i>``, with a small header
key; all expire after the cache TTL. A video record is a hash ``ns:video:<id>`` with one
JSON-encoded field per attribute, so updates of different fields never overwrite each other;
``ns:video-digest:<digest>`` indexes records by content.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from redis.asyncio import Redis

from ..jobs import Sampling, VideoRecord
from .outage import redis_backend

PART = 8 << 20

# Field values are JSON: the status "extracting" is stored with its quotes.
_CLAIM = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 1 end
local updated = tonumber(redis.call('HGET', KEYS[1], 'updated_at')) or 0
if status == '"extracting"' and tonumber(ARGV[1]) - updated <= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'status', '"extracting"', 'updated_at', ARGV[1])
return 1
"""


@redis_backend
class RedisMediaStore:
    def __init__(self, redis: Redis, namespace: str, ttl: int) -> None:
        self.redis, self.ns, self.ttl = redis, namespace, ttl

    def _key(self, digest: str, part: int | str) -> str:
        return f"{self.ns}:media:{digest}:{part}"

    async def put(self, digest: str, data: bytes) -> None:
        parts = max(1, -(-len(data) // PART))
        pipe = self.redis.pipeline(transaction=False)
        for i in range(parts):
            pipe.set(self._key(digest, i), data[i * PART : (i + 1) * PART], ex=self.ttl)
        pipe.set(self._key(digest, "head"), json.dumps({"parts": parts, "size": len(data)}), ex=self.ttl)
        await pipe.execute()

    async def get(self, digest: str) -> bytes | None:
        head = await self.redis.get(self._key(digest, "head"))
        if head is None:
            return None
        meta = json.loads(head)
        parts = await self.redis.mget([self._key(digest, i) for i in range(meta["parts"])])
        if any(p is None for p in parts):
            return None
        data = b"".join(parts)
        if len(data) != meta["size"]:
            return None
        pipe = self.redis.pipeline(transaction=False)  # in use: keep it as long as its features
        for i in range(meta["parts"]):
            pipe.expire(self._key(digest, i), self.ttl)
        pipe.expire(self._key(digest, "head"), self.ttl)
        await pipe.execute()
        return data

    async def delete(self, digest: str) -> None:
        head = await self.redis.get(self._key(digest, "head"))
        parts = json.loads(head)["parts"] if head else 0
        await self.redis.delete(self._key(digest, "head"), *[self._key(digest, i) for i in range(parts)])


@redis_backend
class RedisVideoRegistry:
    def __init__(self, redis: Redis, namespace: str, ttl: int, poll_interval: float = 0.2) -> None:
        self.redis, self.ns, self.ttl, self.poll = redis, namespace, ttl, poll_interval

    def _key(self, video_id: str) -> str:
        return f"{self.ns}:video:{video_id}"

    def _digest_key(self, digest: str) -> str:
        return f"{self.ns}:video-digest:{digest}"

    async def put(self, record: VideoRecord) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self._key(record.id), mapping={k: json.dumps(v) for k, v in record.model_dump().items()})
        pipe.expire(self._key(record.id), self.ttl)
        pipe.sadd(self._digest_key(record.digest), record.id)
        pipe.expire(self._digest_key(record.digest), self.ttl)
        await pipe.execute()

    async def get(self, video_id: str) -> VideoRecord | None:
        raw = await self.redis.hgetall(self._key(video_id))
        if not raw or b"id" not in raw:
            return None
        return VideoRecord.model_validate({k.decode(): json.loads(v) for k, v in raw.items()})

    async def update(self, video_id: str, **changes: object) -> VideoRecord | None:
        key = self._key(video_id)
        if not await self.redis.exists(key):
            return None
        changes["updated_at"] = time.time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={k: json.dumps(v) for k, v in changes.items()})
        pipe.expire(key, self.ttl)
        await pipe.execute()
        return await self.get(video_id)

    async def delete(self, video_id: str) -> VideoRecord | None:
        record = await self.get(video_id)
        if record is not None:
            await self.redis.delete(self._key(video_id))
            await self.redis.srem(self._digest_key(record.digest), video_id)
        return record

    async def by_digest(self, digest: str) -> list[VideoRecord]:
        ids = await self.redis.smembers(self._digest_key(digest))
        records = [await self.get(i.decode()) for i in ids]
        return [r for r in records if r is not None]

    async def find(self, digest: str, sampling: Sampling, subtitles: str | None = None) -> VideoRecord | None:
        for record in await self.by_digest(digest):
            if record.sampling == sampling and record.subtitles == subtitles and record.status != "failed":
                return record
        return None

    async def claim(self, video_id: str, stale_after: float) -> bool:
        """Atomically take the extraction of a video, unless another worker is at it (and alive)."""
        return bool(await self.redis.eval(_CLAIM, 1, self._key(video_id), time.time(), stale_after))

    async def watch(self, video_id: str, timeout: float) -> AsyncIterator[VideoRecord]:
        """Yield the record now and whenever it changes (polled), until ready/failed/gone or timeout."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            record = await self.get(video_id)
            if record is None:
                return
            if record.updated_at != last:
                last = record.updated_at
                yield record
            if record.terminal or time.monotonic() > deadline:
                return
            await asyncio.sleep(self.poll)
