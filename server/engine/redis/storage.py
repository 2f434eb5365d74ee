"""The shared ``MediaStore``, ``VideoRegistry`` and ``RangeBoard`` of a split deployment, on Redis.

Media bytes are split into 8 MiB parts (a Redis string tops out at 512 MiB, and big values
block the server while they are copied) under ``ns:media:<digest>:<i>``, with a small header
key; all expire after the cache TTL. A video record is a hash ``ns:video:<id>`` with one
JSON-encoded field per attribute, so updates of different fields never overwrite each other;
``ns:video-digest:<digest>`` indexes records by content. A range board is a hash
``ns:ranges:<board>`` (``count``, ``size``, ``frames``, and per range ``holder:i``, ``until:i`` in
the server's milliseconds, ``done:i`` with its skipped frames), changed only by scripts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

from redis.asyncio import Redis

from ..jobs import Sampling, VideoRecord
from ..storage import BoardState, RangeClaim
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

# Progress only moves forward, whatever order several workers' reports arrive in.
_ADVANCE = """
if redis.call('HGET', KEYS[1], 'status') ~= '"extracting"' then return 0 end
local done = tonumber(redis.call('HGET', KEYS[1], 'frames_done')) or 0
if tonumber(ARGV[1]) <= done then return 0 end
redis.call('HSET', KEYS[1], 'frames_done', ARGV[1], 'updated_at', ARGV[2])
return 1
"""

# Lease ends are in the server's clock (TIME), so workers' clocks never need to agree.
_NOW_MS = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)"

_CREATE_BOARD = """
redis.call('HSETNX', KEYS[1], 'count', ARGV[1])
redis.call('HSETNX', KEYS[1], 'size', ARGV[2])
redis.call('HSETNX', KEYS[1], 'frames', 0)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return tonumber(redis.call('HGET', KEYS[1], 'size'))
"""

# ``storage.pick_range`` in Lua: the range after the caller's last one, else the middle of the
# longest run of ranges nobody took (its start when it starts the video), else the first expired
# one. ARGV: holder, lease ms, the caller's last range (-1: none). {index, size, resumed} or {}.
_CLAIM_RANGE = _NOW_MS + """
local count = tonumber(redis.call('HGET', KEYS[1], 'count'))
if not count then return {} end
local free, expired = {}, -1
for i = 0, count - 1 do
  if redis.call('HEXISTS', KEYS[1], 'done:' .. i) == 0 then
    local untl = redis.call('HGET', KEYS[1], 'until:' .. i)
    if not untl then free[i] = true
    elseif expired < 0 and tonumber(untl) < now then expired = i end
  end
end
local pick, resumed = -1, 0
local after = tonumber(ARGV[3])
if after >= 0 and free[after + 1] then pick = after + 1 end
if pick < 0 then
  local best_start, best_len, i = -1, 0, 0
  while i < count do
    if free[i] then
      local j = i
      while free[j] do j = j + 1 end
      if j - i > best_len then best_start, best_len = i, j - i end
      i = j
    else i = i + 1 end
  end
  if best_len > 0 then
    pick = best_start
    if best_start > 0 then pick = best_start + math.floor(best_len / 2) end
  end
end
if pick < 0 then pick, resumed = expired, 1 end
if pick < 0 then return {} end
redis.call('HSET', KEYS[1], 'holder:' .. pick, ARGV[1], 'until:' .. pick, now + tonumber(ARGV[2]))
return {pick, tonumber(redis.call('HGET', KEYS[1], 'size')), resumed}
"""

# On a board that still exists (a deleted board stays deleted): HSET or HINCRBY.
_IF_BOARD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call(ARGV[1], KEYS[1], ARGV[2], ARGV[3])
"""

_RENEW_RANGE = _NOW_MS + """
if redis.call('HGET', KEYS[1], 'holder:' .. ARGV[2]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'until:' .. ARGV[2], now + tonumber(ARGV[3]))
return 1
"""


@redis_backend
class RedisRangeBoard:
    def __init__(self, redis: Redis, namespace: str, ttl: int) -> None:
        self.redis, self.ns, self.ttl = redis, namespace, ttl

    def _key(self, board: str) -> str:
        return f"{self.ns}:ranges:{board}"

    async def create(self, board: str, count: int, size: int) -> int:
        return int(await self.redis.eval(_CREATE_BOARD, 1, self._key(board), count, size, self.ttl))

    async def claim(self, board: str, holder: str, lease: float, after: int | None = None) -> RangeClaim | None:
        reply = await self.redis.eval(_CLAIM_RANGE, 1, self._key(board), holder, int(lease * 1000),
                                      -1 if after is None else after)
        return RangeClaim(int(reply[0]), int(reply[1]), bool(reply[2])) if reply else None

    async def renew(self, board: str, holder: str, index: int, lease: float) -> bool:
        return bool(await self.redis.eval(_RENEW_RANGE, 1, self._key(board), holder, index, int(lease * 1000)))

    async def finish(self, board: str, index: int, skipped: list[int]) -> None:
        await self.redis.eval(_IF_BOARD, 1, self._key(board), "HSET", f"done:{index}", json.dumps(skipped))

    async def add_frames(self, board: str, frames: int) -> int:
        return int(await self.redis.eval(_IF_BOARD, 1, self._key(board), "HINCRBY", "frames", frames))

    async def state(self, board: str) -> BoardState:
        raw = {k.decode(): v for k, v in (await self.redis.hgetall(self._key(board))).items()}
        if "count" not in raw:
            return BoardState(0, 0, 0, [])
        done = [json.loads(v) for k, v in raw.items() if k.startswith("done:")]
        return BoardState(int(raw["count"]), len(done), int(raw.get("frames", 0)), sorted(i for s in done for i in s))

    async def delete(self, board: str) -> None:
        await self.redis.delete(self._key(board))


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
        await self._touch(digest, meta["parts"])
        return data

    async def copy_to(self, digest: str, path: Path) -> bool:
        """Write the media into ``path`` a few parts at a time (an hour of 1080p is gigabytes: never
        whole in memory, and the next parts are fetched while these are written)."""
        head = await self.redis.get(self._key(digest, "head"))
        if head is None:
            return False
        meta = json.loads(head)
        batches = [range(i, min(i + 4, meta["parts"])) for i in range(0, meta["parts"], 4)]

        async def fetch(batch: range) -> list[bytes | None]:
            return await self.redis.mget([self._key(digest, i) for i in batch])

        written, pending = 0, asyncio.ensure_future(fetch(batches[0]))
        try:
            with open(path, "wb") as out:
                for number in range(len(batches)):
                    parts = await pending
                    if number + 1 < len(batches):
                        pending = asyncio.ensure_future(fetch(batches[number + 1]))
                    if any(p is None for p in parts):
                        return False  # a part expired: the media is gone
                    written += sum(map(len, parts))
                    await asyncio.to_thread(out.writelines, parts)
        finally:
            pending.cancel()  # done already, unless the copy stopped early
        if written != meta["size"]:
            return False
        await self._touch(digest, meta["parts"])
        return True

    async def has(self, digest: str) -> bool:
        return bool(await self.redis.exists(self._key(digest, "head")))

    def _name_key(self, uuid: str) -> str:
        return f"{self.ns}:media-uuid:{hashlib.sha256(uuid.encode()).hexdigest()}"  # any text, a fixed-size key

    async def name(self, uuid: str, value: str) -> None:
        await self.redis.set(self._name_key(uuid), value, ex=self.ttl)

    async def named(self, uuid: str) -> str | None:
        value = await self.redis.getex(self._name_key(uuid), ex=self.ttl)
        return value.decode() if value is not None else None

    async def _touch(self, digest: str, parts: int) -> None:
        """In use: keep it as long as its features."""
        pipe = self.redis.pipeline(transaction=False)
        for i in range(parts):
            pipe.expire(self._key(digest, i), self.ttl)
        pipe.expire(self._key(digest, "head"), self.ttl)
        await pipe.execute()

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

    async def advance(self, video_id: str, frames_done: int) -> None:
        await self.redis.eval(_ADVANCE, 1, self._key(video_id), frames_done, json.dumps(time.time()))

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
