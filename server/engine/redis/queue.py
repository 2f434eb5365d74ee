"""Jobs and events on Redis Streams, shared by the API (producer) and the workers (consumers).

Layout under a namespace ``ns`` (every key is prefixed, so tests and tenants can share a server):

* ``ns:jobs:questions`` / ``ns:jobs:videos``: streams of job JSON, one consumer group
  ``workers``. A worker acknowledges (and deletes) an entry only after it finished the job; while
  it works it refreshes the entry's idle time, so only a dead worker's job goes idle for longer
  than the visibility timeout and is reclaimed (``XAUTOCLAIM``) by another worker.
* ``ns:events:<request>``: the per-request stream of events a worker emits and the API relays
  as SSE; each event carries the attempt number, so a reclaimed job's replay is recognised.
* ``ns:cancel:<request>``: set by the API when the client goes away; checked every decode step.
* ``ns:lease:<request>``: renewed by whoever relays the request's events to a client (the API);
  a worker stops a job whose lease stayed gone for longer than the lease time: nobody is waiting
  for its answer (the API process died).
* ``ns:attempt:<request>``: incremented by each worker that starts the job.
* ``ns:workers`` / ``ns:worker-cards``: live workers (scored by expiry) and the model they serve.

Every per-request key expires.
"""

from __future__ import annotations

import json
import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from ..events import AnyEvent, dump_event, load_event

GROUP = "workers"
QUESTIONS = "questions"
VIDEOS = "videos"

_EMIT = """
if ARGV[4] == '0' and redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', 100000, '*', 'event', ARGV[1], 'attempt', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# The bound counts the entries not acknowledged yet, except those idle past the visibility
# timeout: a dead worker's job stays in the stream until another worker reclaims it, and must not
# keep new jobs out meanwhile. (XPENDING ... IDLE counts at most ARGV[1] of them: enough to decide.)
_ENQUEUE_BOUNDED = """
local limit = tonumber(ARGV[1])
local depth = redis.call('XLEN', KEYS[1])
if depth >= limit then
  local ok, dead = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[4], 'IDLE', ARGV[3], '-', '+', limit)
  if ok then depth = depth - #dead end
end
if depth >= limit then return false end
return redis.call('XADD', KEYS[1], '*', 'job', ARGV[2])
"""


class RedisJobQueue:
    def __init__(self, redis: Redis, namespace: str, *, event_ttl: int = 3600) -> None:
        self.redis = redis
        self.ns = namespace
        self.event_ttl = event_ttl
        self._groups_ready: set[str] = set()

    def stream(self, queue: str) -> str:
        return f"{self.ns}:jobs:{queue}"

    def events_key(self, request_id: str) -> str:
        return f"{self.ns}:events:{request_id}"

    def cancel_key(self, request_id: str) -> str:
        return f"{self.ns}:cancel:{request_id}"

    def lease_key(self, request_id: str) -> str:
        return f"{self.ns}:lease:{request_id}"

    # -- producer ----------------------------------------------------------------------------------
    async def enqueue(self, queue: str, payload: str) -> str:
        return (await self.redis.xadd(self.stream(queue), {"job": payload})).decode()

    async def enqueue_bounded(self, queue: str, payload: str, limit: int, dead_after_ms: int) -> str | None:
        """Enqueue unless ``limit`` live entries are already unacknowledged (then ``None``);
        entries idle for ``dead_after_ms`` (their worker died) do not count.

        One script, so the check and the append are atomic: a burst of requests, on one API
        process or several, cannot all see room for one more and overshoot the bound.
        """
        entry = await self.redis.eval(_ENQUEUE_BOUNDED, 1, self.stream(queue), limit, payload, dead_after_ms,
                                      GROUP)
        return entry.decode() if entry else None

    async def renew_lease(self, request_id: str, seconds: float) -> None:
        await self.redis.set(self.lease_key(request_id), 1, px=int(seconds * 1000))

    async def depth(self, queue: str) -> int:
        """Entries not yet acknowledged: waiting plus being worked on."""
        return int(await self.redis.xlen(self.stream(queue)))

    async def cancel(self, request_id: str) -> None:
        await self.redis.set(self.cancel_key(request_id), 1, ex=self.event_ttl)

    async def read_events(self, request_id: str, last_id: str,
                          block_ms: int) -> list[tuple[str, int, AnyEvent]]:
        reply = await self.redis.xread({self.events_key(request_id): last_id}, count=256, block=block_ms)
        return [(entry_id.decode(), int(fields.get(b"attempt", b"1")), load_event(fields[b"event"]))
                for _, entries in reply or [] for entry_id, fields in entries]

    # -- consumer ----------------------------------------------------------------------------------
    async def ensure_group(self, queue: str) -> None:
        try:
            await self.redis.xgroup_create(self.stream(queue), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups_ready.add(queue)

    async def read(self, queue: str, consumer: str, count: int, block_ms: int) -> list[tuple[str, str]]:
        """New jobs for this consumer: [(entry id, payload)]. Recreates the group after a Redis restart."""
        if queue not in self._groups_ready:
            await self.ensure_group(queue)
        try:
            reply = await self.redis.xreadgroup(GROUP, consumer, {self.stream(queue): ">"}, count=count,
                                                block=block_ms)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis lost its data (restart without persistence)
                self._groups_ready.discard(queue)
                return []
            raise
        return [(entry_id.decode(), fields[b"job"].decode())
                for _, entries in reply or [] for entry_id, fields in entries]

    async def reclaim(self, queue: str, consumer: str, min_idle_ms: int, count: int) -> list[tuple[str, str]]:
        """Take over jobs whose worker stopped refreshing them (it died)."""
        try:
            reply = await self.redis.xautoclaim(self.stream(queue), GROUP, consumer, min_idle_ms, "0-0",
                                                count=count)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                self._groups_ready.discard(queue)
                return []
            raise
        entries = reply[1] if reply else []
        return [(entry_id.decode(), fields[b"job"].decode()) for entry_id, fields in entries if fields]

    async def touch(self, queue: str, consumer: str, entry_ids: list[str]) -> None:
        """Reset the idle time of jobs this worker is still working on."""
        if entry_ids:
            try:
                await self.redis.xclaim(self.stream(queue), GROUP, consumer, 0, entry_ids, justid=True)
            except ResponseError:
                pass

    async def owners(self, queue: str, entry_ids: list[str]) -> dict[str, str | None]:
        """Who holds each of ``entry_ids`` now: a consumer's name, or None where the entry is pending
        nowhere (acknowledged, or lost with a Redis that restarted without its data)."""
        pipe = self.redis.pipeline(transaction=False)
        for entry_id in entry_ids:
            pipe.xpending_range(self.stream(queue), GROUP, min=entry_id, max=entry_id, count=1)
        owners: dict[str, str | None] = {}
        for entry_id, reply in zip(entry_ids, await pipe.execute(raise_on_error=False)):
            if isinstance(reply, ResponseError) and "NOGROUP" in str(reply):
                reply = []  # the stream itself is gone
            elif isinstance(reply, Exception):
                raise reply
            owners[entry_id] = _text(reply[0]["consumer"]) if reply else None
        return owners

    async def ack(self, queue: str, entry_id: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(self.stream(queue), GROUP, entry_id)
        pipe.xdel(self.stream(queue), entry_id)
        await pipe.execute()

    async def start_attempt(self, request_id: str) -> int:
        key = f"{self.ns}:attempt:{request_id}"
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, self.event_ttl)
        attempt, _ = await pipe.execute()
        return int(attempt)

    async def emit(self, request_id: str, attempt: int, event: AnyEvent, *, first: bool) -> bool:
        """Append an event; False (and nothing appended) when it is not the attempt's first event and
        the stream is gone: Redis lost it (a restart without persistence), so what the relay had not
        read yet is lost and the caller must resend the answer so far."""
        appended = await self.redis.eval(_EMIT, 1, self.events_key(request_id), dump_event(event), attempt,
                                         self.event_ttl, int(first))
        return bool(appended)

    async def request_alive(self, queue: str, entry_id: str, request_id: str) -> bool:
        """Whether anything of the request is still in Redis: its job entry or its events."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(self.events_key(request_id))
        pipe.xrange(self.stream(queue), min=entry_id, max=entry_id, count=1)
        events, entry = await pipe.execute()
        return bool(events) or bool(entry)

    async def cancelled(self, request_id: str) -> tuple[bool, bool]:
        """(the client asked to cancel, someone still holds the request's lease)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(self.cancel_key(request_id))
        pipe.exists(self.lease_key(request_id))
        cancel, lease = await pipe.execute()
        return bool(cancel), bool(lease)

    # -- worker membership -----------------------------------------------------------------------
    # A sorted set of worker ids scored by when their advertisement expires, and a hash of their
    # model cards: finding the live workers is two small reads, whatever else the Redis holds.
    async def advertise(self, worker_id: str, card: str, ttl: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(f"{self.ns}:workers", {worker_id: time.time() + ttl})
        pipe.hset(f"{self.ns}:worker-cards", worker_id, card)
        for key in (f"{self.ns}:workers", f"{self.ns}:worker-cards"):  # gone with the last worker
            pipe.expire(key, max(60, int(20 * ttl)))
        await pipe.execute()

    async def live_workers(self) -> list[dict]:
        now = time.time()
        workers, cards = f"{self.ns}:workers", f"{self.ns}:worker-cards"
        stale = await self.redis.zrangebyscore(workers, "-inf", now)
        if stale:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrem(workers, *stale)
            pipe.hdel(cards, *stale)
            await pipe.execute()
        live = await self.redis.zrangebyscore(workers, now, "+inf")
        if not live:
            return []
        return [json.loads(raw) for raw in await self.redis.hmget(cards, live) if raw]

    async def retire(self, worker_id: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(f"{self.ns}:workers", worker_id)
        pipe.hdel(f"{self.ns}:worker-cards", worker_id)
        await pipe.execute()

    async def forget(self, request_id: str) -> None:
        await self.redis.delete(self.events_key(request_id), self.cancel_key(request_id),
                                self.lease_key(request_id), f"{self.ns}:attempt:{request_id}")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def encode_card(card: Any) -> str:
    return json.dumps(card.__dict__)
