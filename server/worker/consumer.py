"""The split deployment's worker loop: jobs from Redis streams in, events back out, nothing stuck.

Two kinds of job (questions and video extractions, so a long extraction never holds up questions
about cached videos), each on a shared stream and on one stream per worker (the jobs routed to it
because it holds their video's features, ``engine/redis/routing.py``); one consumer group. The
rules that keep every job moving:

* **Capacity, not locks.** A consumer waits for room before it reads (its own stream first, then
  the shared one), but does not hold that room while its read blocks; reclaiming runs on its own
  schedule and takes what room there is. So a dead worker's job is picked up within the
  visibility timeout by any worker with room, and the jobs still waiting in a dead worker's own
  stream are adopted as soon as its advertisement lapses.
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
from ..engine.redis.queue import QUESTIONS, VIDEOS, Entry, RedisJobQueue, encode_card
from ..settings import Settings
from .runner import ModelRunner

log = logging.getLogger(__name__)

T = TypeVar("T")
HEARTBEAT_SECONDS = 2.0
LEASE_GRACE_SECONDS = 3.0  # the API renews every second; after a Redis restart the lease is back in ~1 s
SHUTDOWN_SECONDS = 10.0


class HelpRequests:
    """Queues helper jobs for a long video's extraction on the shared video stream: one per other
    live worker, at most one per range still to take (``FeatureSource`` calls this)."""

    def __init__(self, queue: RedisJobQueue, settings: Settings) -> None:
        self.queue, self.settings = queue, settings

    async def __call__(self, job: VideoJob, most: int) -> None:
        others = len(await self.queue.live_workers()) - 1
        for _ in range(max(0, min(most, others))):
            if await self.queue.enqueue_bounded(VIDEOS, job.model_dump_json(), self.settings.video_queue_size,
                                                int(self.settings.visibility_timeout * 1000)) is None:
                break  # the video queue is full: the workers have enough to do


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
        self.own = {queue: self.queue.stream(queue, self.id) for queue in (QUESTIONS, VIDEOS)}
        self.inflight: dict[str, set[tuple[str, str]]] = {QUESTIONS: set(), VIDEOS: set()}  # (stream, entry)
        self.lost: set[tuple[str, str]] = set()  # entries another worker reclaimed from this one
        self.jobs: set[asyncio.Task] = set()
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        loops = [asyncio.ensure_future(loop) for loop in (
            self._heartbeat(), self._consume(QUESTIONS), self._consume(VIDEOS),
            self._reclaim(QUESTIONS), self._reclaim(VIDEOS), self._adopt())]
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
                await self.queue.advertise(self.id, card, ttl=3 * HEARTBEAT_SECONDS,
                                           own_streams=list(self.own.values()))
                by_stream: dict[str, list[str]] = {}
                for stream, entry in set().union(*self.inflight.values()):
                    by_stream.setdefault(stream, []).append(entry)
                for stream, ids in by_stream.items():
                    owners = await self.queue.owners(stream, sorted(ids))
                    self.lost |= {(stream, e) for e, owner in owners.items() if owner not in (None, self.id)}
                    await self.queue.touch(stream, self.id, [e for e, owner in owners.items() if owner == self.id])
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(interval)

    async def _consume(self, queue: str) -> None:
        """Its own stream first, then the shared one. Both are read in one call (one entry from
        each at most), so with one slot free this may start one job more than the capacity: the
        decode scheduler queues it (``max_running``), the capacity only keeps reads from running ahead."""
        streams = [self.own[queue], self.queue.stream(queue)]
        while True:
            await self.capacity[queue].wait_free()
            try:
                entries = await self.queue.read(streams, self.id, count=1, block_ms=1000)
            except Exception as exc:
                log.warning("reading %s failed: %s", queue, exc)
                await asyncio.sleep(1.0)
                continue
            for entry in entries:
                self._start(queue, entry)

    async def _reclaim(self, queue: str) -> None:
        """Take over the jobs of workers that stopped refreshing them, on every stream of ``queue``."""
        idle_ms = int(self.settings.visibility_timeout * 1000)
        while True:
            await asyncio.sleep(max(0.25, self.settings.visibility_timeout / 4))
            try:
                live, dead = await self.queue.routed_workers()
                for stream in [self.queue.stream(queue)] + [self.queue.stream(queue, w) for w in live + dead]:
                    free = self.capacity[queue].free
                    if free <= 0:
                        break
                    for entry in await self.queue.reclaim(stream, self.id, idle_ms, count=free):
                        if entry[:2] in self.inflight[queue]:
                            continue  # its own job, still running: the refresh was late, the worker is alive
                        log.warning("reclaimed %s job %s from a worker that stopped", queue, entry[1])
                        self._start(queue, entry)
            except Exception as exc:
                log.warning("reclaiming %s failed: %s", queue, exc)

    async def _adopt(self) -> None:
        """Jobs still waiting in the own streams of workers whose advertisement lapsed are read
        here (as from the shared stream); empty streams of dead workers are deleted."""
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                _, dead = await self.queue.routed_workers()
                for worker in dead:
                    for queue in (QUESTIONS, VIDEOS):
                        free = self.capacity[queue].free
                        if free > 0:
                            for entry in await self.queue.read([self.queue.stream(queue, worker)], self.id,
                                                               count=free, block_ms=None, create=False):
                                log.warning("adopted %s job %s of worker %s, which is gone", queue, entry[1],
                                            worker)
                                self._start(queue, entry)
                    if await self.queue.drop_worker_streams(worker, (QUESTIONS, VIDEOS)):
                        log.info("deleted the empty job streams of worker %s, which is gone", worker)
            except Exception as exc:
                log.warning("adopting the jobs of dead workers failed: %s", exc)

    def _start(self, queue: str, entry: Entry) -> None:
        stream, entry_id, payload = entry
        self.capacity[queue].take()
        self.inflight[queue].add((stream, entry_id))
        task = asyncio.ensure_future(self._run(queue, stream, entry_id, payload))
        self.jobs.add(task)
        task.add_done_callback(self.jobs.discard)

    async def _run(self, queue: str, stream: str, entry_id: str, payload: str) -> None:
        try:  # a cancellation (shutdown) or a backend outage skips the ack: the job is reclaimed and retried
            try:
                if queue == VIDEOS:
                    await self.runner.extract(VideoJob.model_validate_json(payload))
                else:
                    await self._answer(QuestionJob.model_validate_json(payload), (stream, entry_id))
            except EngineUnavailable as exc:
                log.warning("job %s on %s stopped: %s; it will be reclaimed", entry_id, stream, exc)
                return
            except Exception:
                log.exception("job %s on %s failed", entry_id, stream)
            if (stream, entry_id) not in self.lost:  # a reclaimed job is acknowledged by its new owner
                await _retry(lambda: self.queue.ack(stream, entry_id), until=float("inf"), what="ack")
        finally:
            self.inflight[queue].discard((stream, entry_id))
            self.lost.discard((stream, entry_id))
            await self.capacity[queue].release()

    async def _answer(self, job: QuestionJob, entry: tuple[str, str]) -> None:
        rid = job.request_id
        attempt = await _retry(lambda: self.queue.start_attempt(rid), until=job.deadline, what="start")
        lease_gone_since: float | None = None
        answers: dict[int, DeltaEvent] = {}  # each answer so far, to resend if Redis loses the events stream
        first = True

        async def send(event: AnyEvent, *, first: bool) -> bool:
            return await _retry(lambda: self.queue.emit(rid, attempt, event, first=first), until=job.deadline,
                                what="emit")

        async def emit(event: AnyEvent) -> None:
            nonlocal first
            if isinstance(event, DeltaEvent):
                answers[event.index] = _so_far(answers.get(event.index), event)
            if not await send(event, first=first):
                log.warning("the events of %s vanished from Redis; resending the answer so far", rid)
                for i, resend in enumerate(answers.values()):
                    await send(resend, first=i == 0)
                if not isinstance(event, DeltaEvent):
                    await send(event, first=not answers)
            first = False

        async def cancelled() -> bool:
            nonlocal lease_gone_since
            if entry in self.lost:
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


def _so_far(before: DeltaEvent | None, event: DeltaEvent) -> DeltaEvent:
    """One answer from its start to ``event``, as a single delta a relay can take in place of all."""
    if before is None:
        before = DeltaEvent(text="", index=event.index)
    logprobs = None
    if event.logprobs is not None:
        logprobs = (before.logprobs or [])[: event.token_offset] + event.logprobs
    return DeltaEvent(text=before.text[: event.offset] + event.text, offset=0, index=event.index,
                      logprobs=logprobs, token_offset=0, finish_reason=event.finish_reason)
