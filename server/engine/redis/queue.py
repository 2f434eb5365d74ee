"""Jobs and events on Redis Streams, shared by the API (producer) and the workers (consumers).

Layout under a namespace ``ns`` (every key is prefixed, so tests and tenants can share a server):

* ``ns:jobs:questions`` / ``ns:jobs:videos``: the shared streams of job JSON, one consumer group
  ``workers``. A worker acknowledges (and deletes) an entry only after it finished the job; while
  it works it refreshes the entry's idle time, so only a dead worker's job goes idle for longer
  than the visibility timeout and is reclaimed (``XAUTOCLAIM``) by another worker.
* ``ns:jobs:questions@<worker>`` / ``ns:jobs:videos@<worker>``: one worker's own streams (same
  group), where jobs about the videos it owns are routed (``routing.py``). The worker reads them
  before the shared ones; when it is gone, the others adopt what is left in them, and the last
  one to find them empty deletes them. ``ns:routed`` lists the workers that have such streams.
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

Entry = tuple[str, str, str]  # (stream key, entry id, job JSON)

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

# KEYS: the worker's stream, the live-workers zset; ARGV: worker id, now, limit, job JSON.
_ENQUEUE_TO_WORKER = """
local expiry = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not expiry or tonumber(expiry) < tonumber(ARGV[2]) then return {'gone', ''} end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[3]) then return {'busy', ''} end
return {'ok', redis.call('XADD', KEYS[1], '*', 'job', ARGV[4])}
"""

# KEYS: the live-workers zset, the routed set, the worker's streams; ARGV: worker id, now.
_DROP_STREAMS = """
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if expiry and tonumber(expiry) >= tonumber(ARGV[2]) then return 0 end
for i = 3, #KEYS do
  if redis.call('XLEN', KEYS[i]) > 0 then return 0 end
end
for i = 3, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"""


class RedisJobQueue:
    def __init__(self, redis: Redis, namespace: str, *, event_ttl: int = 3600) -> None:
        self.redis = redis
        self.ns = namespace
        self.event_ttl = event_ttl
        self._groups_ready: set[str] = set()

    def stream(self, queue: str, worker: str | None = None) -> str:
        """The shared stream of ``queue``, or ``worker``'s own."""
        return f"{self.ns}:jobs:{queue}" if worker is None else f"{self.ns}:jobs:{queue}@{worker}"

    @property
    def _workers_key(self) -> str:
        return f"{self.ns}:workers"

    @property
    def _routed_key(self) -> str:
        return f"{self.ns}:routed"

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

    async def enqueue_to_worker(self, queue: str, worker: str, payload: str, limit: int) -> tuple[str | None, str]:
        """Append to ``worker``'s own stream: ``(entry id, "ok")``, or ``(None, "busy")`` when
        ``limit`` of its jobs are waiting or running, or ``(None, "gone")`` when its advertisement
        has lapsed. One script, so no job lands in the stream of a worker already found dead
        (whose streams the others may be deleting)."""
        status, entry = await self.redis.eval(
            _ENQUEUE_TO_WORKER, 2, self.stream(queue, worker), self._workers_key, worker, time.time(), limit,
            payload)
        return (entry.decode() if status == b"ok" else None), status.decode()

    async def renew_lease(self, request_id: str, seconds: float) -> None:
        await self.redis.set(self.lease_key(request_id), 1, px=int(seconds * 1000))

    async def depth(self, stream: str) -> int:
        """Entries not yet acknowledged: waiting plus being worked on."""
        return int(await self.redis.xlen(stream))

    async def cancel(self, request_id: str) -> None:
        await self.redis.set(self.cancel_key(request_id), 1, ex=self.event_ttl)

    async def read_events(self, request_id: str, last_id: str,
                          block_ms: int) -> list[tuple[str, int, AnyEvent]]:
        reply = await self.redis.xread({self.events_key(request_id): last_id}, count=256, block=block_ms)
        return [(entry_id.decode(), int(fields.get(b"attempt", b"1")), load_event(fields[b"event"]))
                for _, entries in reply or [] for entry_id, fields in entries]

    # -- consumer ----------------------------------------------------------------------------------
    # Every method takes full stream keys (``stream()``): a worker reads its own streams and the
    # shared ones, and adopts those of dead workers. Entry ids are unique only within a stream.
    async def ensure_group(self, stream: str) -> None:
        try:
            await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups_ready.add(stream)

    async def read(self, streams: list[str], consumer: str, count: int, block_ms: int | None, *,
                   create: bool = True) -> list[Entry]:
        """New jobs for this consumer from ``streams`` (earlier ones first, ``count`` from each):
        [(stream, entry id, payload)]. A group lost with a Redis restart is recreated, unless not
        ``create`` (another worker's streams, which may have just been deleted). ``block_ms`` None:
        no waiting."""
        for stream in streams:
            if create and stream not in self._groups_ready:
                await self.ensure_group(stream)
        try:
            reply = await self.redis.xreadgroup(GROUP, consumer, dict.fromkeys(streams, ">"), count=count,
                                                block=block_ms)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis lost its data (restart without persistence)
                self._groups_ready.difference_update(streams)
                return []
            raise
        return [(_text(stream), entry_id.decode(), fields[b"job"].decode())
                for stream, entries in reply or [] for entry_id, fields in entries if fields]

    async def reclaim(self, stream: str, consumer: str, min_idle_ms: int, count: int) -> list[Entry]:
        """Take over jobs whose worker stopped refreshing them (it died)."""
        try:
            reply = await self.redis.xautoclaim(stream, GROUP, consumer, min_idle_ms, "0-0", count=count)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                self._groups_ready.discard(stream)
                return []
            raise
        entries = reply[1] if reply else []
        return [(stream, entry_id.decode(), fields[b"job"].decode()) for entry_id, fields in entries if fields]

    async def touch(self, stream: str, consumer: str, entry_ids: list[str]) -> None:
        """Reset the idle time of jobs this worker is still working on."""
        if entry_ids:
            try:
                await self.redis.xclaim(stream, GROUP, consumer, 0, entry_ids, justid=True)
            except ResponseError:
                pass

    async def owners(self, stream: str, entry_ids: list[str]) -> dict[str, str | None]:
        """Who holds each of ``entry_ids`` now: a consumer's name, or None where the entry is pending
        nowhere (acknowledged, or lost with a Redis that restarted without its data)."""
        pipe = self.redis.pipeline(transaction=False)
        for entry_id in entry_ids:
            pipe.xpending_range(stream, GROUP, min=entry_id, max=entry_id, count=1)
        owners: dict[str, str | None] = {}
        for entry_id, reply in zip(entry_ids, await pipe.execute(raise_on_error=False)):
            if isinstance(reply, ResponseError) and "NOGROUP" in str(reply):
                reply = []  # the stream itself is gone
            elif isinstance(reply, Exception):
                raise reply
            owners[entry_id] = _text(reply[0]["consumer"]) if reply else None
        return owners

    async def ack(self, stream: str, entry_id: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(stream, GROUP, entry_id)
        pipe.xdel(stream, entry_id)
        await pipe.execute()

    async def routed_workers(self) -> tuple[list[str], list[str]]:
        """(live, dead) workers that have streams of their own."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.smembers(self._routed_key)
        pipe.zrangebyscore(self._workers_key, time.time(), "+inf")
        routed, live = await pipe.execute()
        live_ids = {_text(w) for w in live}
        routed_ids = sorted(_text(w) for w in routed)
        return [w for w in routed_ids if w in live_ids], [w for w in routed_ids if w not in live_ids]

    async def drop_worker_streams(self, worker: str, queues: tuple[str, ...]) -> bool:
        """Delete a dead worker's streams once nothing is left in them (atomically: never while a
        job is in one, never once it is advertised again)."""
        keys = [self.stream(q, worker) for q in queues]
        dropped = await self.redis.eval(_DROP_STREAMS, 2 + len(keys), self._workers_key, self._routed_key, *keys,
                                        worker, time.time())
        if dropped:
            self._groups_ready.difference_update(keys)
        return bool(dropped)

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

    async def request_alive(self, stream: str, entry_id: str, request_id: str) -> bool:
        """Whether anything of the request is still in Redis: its job entry or its events."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(self.events_key(request_id))
        pipe.xrange(stream, min=entry_id, max=entry_id, count=1)
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
    async def advertise(self, worker_id: str, card: str, ttl: float, *, own_streams: list[str] = ()) -> None:
        """Announce the worker (and its own streams, groups first: a job routed to it as soon as it
        counts as live must find the group there)."""
        pipe = self.redis.pipeline(transaction=False)
        for stream in own_streams:
            pipe.xgroup_create(stream, GROUP, id="0", mkstream=True)
        if own_streams:
            pipe.sadd(self._routed_key, worker_id)
        pipe.zadd(self._workers_key, {worker_id: time.time() + ttl})
        pipe.hset(f"{self.ns}:worker-cards", worker_id, card)
        for key in (self._workers_key, f"{self.ns}:worker-cards", self._routed_key):  # gone with the last worker
            pipe.expire(key, max(60, int(20 * ttl)))
        for reply in await pipe.execute(raise_on_error=False):
            if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
                raise reply

    async def live_workers(self) -> list[dict]:
        now = time.time()
        workers, cards = self._workers_key, f"{self.ns}:worker-cards"
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
