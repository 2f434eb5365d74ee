"""The split deployment's worker loop: jobs from Redis streams in, events back out, nothing stuck.

Two streams (questions and video extractions, so a long extraction never holds up questions
about cached videos), each with a consumer group. The rules that keep every job moving:

* **Capacity, not locks.** A consumer waits for room before it reads, but does not hold that room
  while its read blocks; reclaiming runs on its own schedule and takes what room there is. So a
  dead worker's job is picked up within the visibility timeout by any worker with room.
* **Heartbeat by ownership.** Every few seconds the worker advertises itself and refreshes the
  jobs it still owns. A job now pending under another worker was reclaimed (this one stalled):
  it stops. A job pending nowhere vanished with a Redis that restarted empty: nobody else will run
  it, so it goes on and its events still reach the API, which kept reading.
* **Leases.** The API renews a lease on each request it relays; a job whose lease stays gone longer
  than ``LEASE_GRACE_SECONDS`` has nobody waiting for it (the API died) and stops.
* **Redis errors are retried, within bounds**: a job's events until its deadline, acknowledgements
  until shutdown, and shutdown itself takes at most ``SHUTDOWN_SECONDS`` (unfinished jobs are left
  unacknowledged, for another worker to reclaim).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import Redis

from ..engine.events import AnyEvent, DeltaEvent, ErrorEvent
from ..engine.jobs import QuestionJob, VideoJob
from ..engine.protocol import EngineUnavailable, ModelCard
from ..engine.redis.queue import QUESTIONS, VIDEOS, RedisJobQueue, encode_card
from ..settings import Settings
from .runner import ModelRunner

log = logging.getLogger(__name__)

T = TypeVar("T")
HEARTBEAT_SECONDS = 2.0
LEASE_GRACE_SECONDS = 3.0  # the API renews every second; after a Redis restart the lease is back in ~1 s
SHUTDOWN_SECONDS = 10.0


class Capacity:
    """How many jobs of one stream this worker runs at once."""

    def __init__(self, limit: int) -> None:
        self.limit, self.running = limit, 0
        self._changed = asyncio.Condition()

    @property
    def free(self) -> int:
        return self.limit - self.running

    async def wait_free(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.free > 0)

    def take(self) -> None:
        self.running += 1

    async def release(self) -> None:
        async with self._changed:
            self.running -= 1
            self._changed.notify_all()


class RedisWorker:
    def __init__(self, settings: Settings, redis: Redis, runner: ModelRunner, card: ModelCard, *,
                 advertised: dict[str, object] | None = None) -> None:
        self.settings = settings
        self.redis = redis
        self.runner = runner
        self.card = card
        self.advertised = advertised or {}  # beside the model card: where its metrics are, its GPU
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.queue = RedisJobQueue(redis, settings.redis_namespace,
                                   event_ttl=int(settings.request_timeout) + 600)
        self.capacity = {QUESTIONS: Capacity(settings.max_running + 2), VIDEOS: Capacity(1)}
        self.inflight: dict[str, set[str]] = {QUESTIONS: set(), VIDEOS: set()}
        self.lost: set[str] = set()  # entries another worker reclaimed from this one
        self.jobs: set[asyncio.Task] = set()
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        loops = [asyncio.ensure_future(loop) for loop in (
            self._heartbeat(), self._consume(QUESTIONS), self._consume(VIDEOS),
            self._reclaim(QUESTIONS), self._reclaim(VIDEOS))]
        await self.stopping.wait()
        for task in loops:
            task.cancel()
        if self.jobs:  # finish briefly; what does not finish stays unacknowledged, for another worker
            await asyncio.wait(self.jobs, timeout=SHUTDOWN_SECONDS)
            for task in self.jobs:
                task.cancel()
        try:
            await asyncio.wait_for(self.queue.retire(self.id), timeout=2.0)
        except Exception as exc:  # Redis down: the advertisement simply expires
            log.warning("could not retire from Redis: %s", exc)

    async def _heartbeat(self) -> None:
        """Advertise this worker and keep its jobs fresh; stop the jobs another worker took over."""
        # Jobs in progress must be refreshed well within the visibility timeout, or live jobs look dead.
        interval = min(HEARTBEAT_SECONDS, self.settings.visibility_timeout / 3)
        card = json.dumps({**json.loads(encode_card(self.card)), "worker_id": self.id, **self.advertised})
        while True:
            try:
                await self.queue.advertise(self.id, card, ttl=3 * HEARTBEAT_SECONDS)
                for queue, ids in self.inflight.items():
                    owners = await self.queue.owners(queue, sorted(ids))
                    self.lost |= {entry for entry, owner in owners.items() if owner not in (None, self.id)}
                    await self.queue.touch(queue, self.id,
                                           [entry for entry, owner in owners.items() if owner == self.id])
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(interval)

    async def _consume(self, queue: str) -> None:
        while True:
            await self.capacity[queue].wait_free()
            try:
                entries = await self.queue.read(queue, self.id, count=1, block_ms=1000)
            except Exception as exc:
                log.warning("reading %s failed: %s", queue, exc)
                await asyncio.sleep(1.0)
                continue
            for entry_id, payload in entries:
                self._start(queue, entry_id, payload)

    async def _reclaim(self, queue: str) -> None:
        idle_ms = int(self.settings.visibility_timeout * 1000)
        while True:
            await asyncio.sleep(max(0.25, self.settings.visibility_timeout / 4))
            free = self.capacity[queue].free
            if free <= 0:
                continue
            try:
                entries = await self.queue.reclaim(queue, self.id, idle_ms, count=free)
            except Exception as exc:
                log.warning("reclaiming %s failed: %s", queue, exc)
                continue
            for entry_id, payload in entries:
                if entry_id in self.inflight[queue]:
                    continue  # its own job, still running: the refresh was late, the worker is alive
                log.warning("reclaimed %s job %s from a worker that stopped", queue, entry_id)
                self._start(queue, entry_id, payload)

    def _start(self, queue: str, entry_id: str, payload: str) -> None:
        self.capacity[queue].take()
        self.inflight[queue].add(entry_id)
        task = asyncio.ensure_future(self._run(queue, entry_id, payload))
        self.jobs.add(task)
        task.add_done_callback(self.jobs.discard)

    async def _run(self, queue: str, entry_id: str, payload: str) -> None:
        try:  # a cancellation (shutdown) or a backend outage skips the ack: the job is reclaimed and retried
            try:
                if queue == VIDEOS:
                    await self.runner.extract(VideoJob.model_validate_json(payload))
                else:
                    await self._answer(QuestionJob.model_validate_json(payload), entry_id)
            except EngineUnavailable as exc:
                log.warning("job %s on %s stopped: %s; it will be reclaimed", entry_id, queue, exc)
                return
            except Exception:
                log.exception("job %s on %s failed", entry_id, queue)
            if entry_id not in self.lost:  # a reclaimed job is acknowledged by its new owner
                await _retry(lambda: self.queue.ack(queue, entry_id), until=float("inf"), what="ack")
        finally:
            self.inflight[queue].discard(entry_id)
            self.lost.discard(entry_id)
            await self.capacity[queue].release()

    async def _answer(self, job: QuestionJob, entry_id: str) -> None:
        rid = job.request_id
        attempt = await _retry(lambda: self.queue.start_attempt(rid), until=job.deadline, what="start")
        lease_gone_since: float | None = None
        answer, first = "", True  # the answer so far, to resend if Redis loses the events stream

        async def send(event: AnyEvent, *, first: bool) -> bool:
            return await _retry(lambda: self.queue.emit(rid, attempt, event, first=first), until=job.deadline,
                                what="emit")

        async def emit(event: AnyEvent) -> None:
            nonlocal answer, first
            if isinstance(event, DeltaEvent):
                answer = answer[: event.offset] + event.text
            if not await send(event, first=first):
                log.warning("the events of %s vanished from Redis; resending the answer so far", rid)
                await send(DeltaEvent(text=answer, offset=0), first=True)
                if not isinstance(event, DeltaEvent):
                    await send(event, first=False)
            first = False

        async def cancelled() -> bool:
            nonlocal lease_gone_since
            if entry_id in self.lost:
                return True
            try:
                cancel, leased = await self.queue.cancelled(rid)
            except Exception:
                return False  # Redis unreachable: keep going; the events wait in emit's retries
            if cancel:
                return True
            if leased:
                lease_gone_since = None
                return False
            lease_gone_since = lease_gone_since or time.monotonic()
            if time.monotonic() - lease_gone_since > LEASE_GRACE_SECONDS:
                log.warning("stopping %s: nobody has relayed it for %.0f s", rid, LEASE_GRACE_SECONDS)
                return True
            return False

        try:
            await self.runner.answer(job, emit, cancelled)
        except Exception as exc:
            await emit(ErrorEvent(status=500, code="internal_error", message=f"internal error: {exc}"))
            raise


async def _retry(action: Callable[[], Awaitable[T]], *, until: float, what: str) -> T:
    """``action`` again every second while Redis fails, until the unix time ``until``."""
    while True:
        try:
            return await action()
        except Exception as exc:
            if time.time() >= until:
                raise
            log.warning("%s: Redis unavailable (%s); retrying", what, exc)
            await asyncio.sleep(1.0)
