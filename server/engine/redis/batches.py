"""The shared ``BatchStore`` of a split deployment, on Redis: every API process sees every batch.

* ``ns:file:<id>``: a file's record (JSON); ``ns:files``: a sorted set of file ids by creation.
* ``ns:batch:<id>``: a hash, one JSON-encoded field per attribute (updates of different fields never
  overwrite each other) plus the integer counts ``completed`` / ``failed``; ``ns:batches``: ids by
  creation; ``ns:batches-active``: the ids of batches not yet terminal (what a process scans for
  batches to take over).
* ``ns:batch-results:<id>``: a hash line -> ``"1"|"0"`` + the result line; a result and its count
  are written by one script, only if the line has none yet, so a line is counted once whoever
  reports it.
* ``ns:batch-lease:<id>``: the id of the API process running the batch, expiring after the lease
  (in the server's clock: ``PX``); taken with ``SET NX``, renewed and released only by its holder.

Records expire with the media they refer to (``cache_ttl_seconds``, renewed on every change).
"""

from __future__ import annotations

import json

from redis.asyncio import Redis

from ...settings import Settings
from ..batches import COUNTED, TERMINAL, BatchRecord, FileRecord
from .outage import connect, redis_backend

_RECORD = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
return 1
"""

_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


@redis_backend
class RedisBatchStore:
    def __init__(self, redis: Redis, namespace: str, ttl: int) -> None:
        self.redis, self.ns, self.ttl = redis, namespace, ttl

    def _file(self, file_id: str) -> str:
        return f"{self.ns}:file:{file_id}"

    def _batch(self, batch_id: str) -> str:
        return f"{self.ns}:batch:{batch_id}"

    def _results(self, batch_id: str) -> str:
        return f"{self.ns}:batch-results:{batch_id}"

    def _lease(self, batch_id: str) -> str:
        return f"{self.ns}:batch-lease:{batch_id}"

    # -- files -------------------------------------------------------------------------------------
    async def put_file(self, record: FileRecord) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self._file(record.id), record.model_dump_json(), ex=self.ttl)
        pipe.zadd(f"{self.ns}:files", {record.id: record.created_at})
        await pipe.execute()

    async def get_file(self, file_id: str) -> FileRecord | None:
        raw = await self.redis.get(self._file(file_id))
        return FileRecord.model_validate_json(raw) if raw else None

    async def delete_file(self, file_id: str) -> FileRecord | None:
        record = await self.get_file(file_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self._file(file_id))
        pipe.zrem(f"{self.ns}:files", file_id)
        await pipe.execute()
        return record

    async def list_files(self) -> list[FileRecord]:
        ids = [i.decode() for i in await self.redis.zrange(f"{self.ns}:files", 0, -1)]
        if not ids:
            return []
        raws = await self.redis.mget([self._file(i) for i in ids])
        gone = [i for i, raw in zip(ids, raws) if raw is None]  # expired
        if gone:
            await self.redis.zrem(f"{self.ns}:files", *gone)
        return [FileRecord.model_validate_json(raw) for raw in raws if raw is not None]

    # -- batches -----------------------------------------------------------------------------------
    async def put_batch(self, record: BatchRecord) -> None:
        fields = {k: json.dumps(v) for k, v in record.model_dump(exclude=set(COUNTED)).items()}
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self._batch(record.id), mapping={**fields, "completed": 0, "failed": 0})
        pipe.expire(self._batch(record.id), self.ttl)
        pipe.zadd(f"{self.ns}:batches", {record.id: record.created_at})
        if not record.terminal:
            pipe.sadd(f"{self.ns}:batches-active", record.id)
        await pipe.execute()

    async def get_batch(self, batch_id: str) -> BatchRecord | None:
        raw = await self.redis.hgetall(self._batch(batch_id))
        if not raw or b"id" not in raw:
            return None
        data = {k.decode(): (int(v) if k.decode() in COUNTED else json.loads(v)) for k, v in raw.items()}
        return BatchRecord.model_validate(data)

    async def update_batch(self, batch_id: str, **changes: object) -> BatchRecord | None:
        key = self._batch(batch_id)
        if any(k in COUNTED for k in changes):
            raise ValueError("the counts come from the results")
        if not await self.redis.exists(key):
            return None
        encoded = {k: json.dumps(v, default=lambda o: o.model_dump()) for k, v in changes.items()}
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping=encoded)
        pipe.expire(key, self.ttl)
        if changes.get("status") in TERMINAL:
            pipe.srem(f"{self.ns}:batches-active", batch_id)
        await pipe.execute()
        return await self.get_batch(batch_id)

    async def list_batches(self) -> list[BatchRecord]:
        ids = [i.decode() for i in await self.redis.zrange(f"{self.ns}:batches", 0, -1)]
        records = [await self.get_batch(i) for i in ids]
        gone = [i for i, r in zip(ids, records) if r is None]
        if gone:
            await self.redis.zrem(f"{self.ns}:batches", *gone)
        return [r for r in records if r is not None]

    async def active_batches(self) -> list[str]:
        ids = [i.decode() for i in await self.redis.smembers(f"{self.ns}:batches-active")]
        alive = []
        for i in ids:
            if await self.redis.exists(self._batch(i)):
                alive.append(i)
            else:
                await self.redis.srem(f"{self.ns}:batches-active", i)
        return alive

    # -- results -----------------------------------------------------------------------------------
    async def record_result(self, batch_id: str, line: int, ok: bool, data: str) -> bool:
        value = ("1" if ok else "0") + data
        return bool(await self.redis.eval(_RECORD, 2, self._results(batch_id), self._batch(batch_id), line, value,
                                          "completed" if ok else "failed", self.ttl))

    async def results(self, batch_id: str) -> dict[int, tuple[bool, str]]:
        raw = await self.redis.hgetall(self._results(batch_id))
        return {int(k): (v[:1] == b"1", v[1:].decode()) for k, v in raw.items()}

    async def drop_results(self, batch_id: str) -> None:
        await self.redis.delete(self._results(batch_id))  # the counts stay in the batch's hash

    # -- the lease ---------------------------------------------------------------------------------
    async def acquire(self, batch_id: str, holder: str, lease: float) -> bool:
        key, ms = self._lease(batch_id), int(lease * 1000)
        if await self.redis.set(key, holder, nx=True, px=ms):
            return True
        return await self.renew(batch_id, holder, lease)  # ours already (a restart of the same holder)

    async def renew(self, batch_id: str, holder: str, lease: float) -> bool:
        return bool(await self.redis.eval(_RENEW, 1, self._lease(batch_id), holder, int(lease * 1000)))

    async def release(self, batch_id: str, holder: str) -> None:
        await self.redis.eval(_RELEASE, 1, self._lease(batch_id), holder)

    async def close(self) -> None:
        await self.redis.aclose()


def redis_batch_store(settings: Settings) -> RedisBatchStore:
    """The batch store of ``llamavid api``: the queue Redis (``LLAMAVID_REDIS_URL``), its own connection."""
    if not settings.redis_url:
        raise ValueError("a split deployment needs LLAMAVID_REDIS_URL")
    return RedisBatchStore(connect(settings.redis_url), settings.redis_namespace, settings.cache_ttl_seconds)
