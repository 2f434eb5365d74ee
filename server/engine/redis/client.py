"""The API side of a split deployment: jobs go to GPU workers through Redis.

``ask`` queues the question and relays the worker's events. If the worker dies mid-answer,
another worker reclaims the job and replays it from the start with the same seed; events carry
an attempt number, and the relay forwards only the text beyond what the client already has,
checking that the replay agrees with it, so the client sees one complete answer, or a clear
error if the replay diverged, and never a duplicate.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from redis.asyncio import Redis

from cache.purge import delete_video_keys

from ...metrics import LlamaVidMetrics
from ...settings import Settings
from ..events import DeltaEvent, DoneEvent, ErrorEvent, ProgressEvent, RelevanceEvent
from ..jobs import QuestionJob, VideoJob
from ..protocol import EngineUnavailable, EventStream, ModelCard, QueueFull
from .outage import redis_backend
from .queue import QUESTIONS, VIDEOS, RedisJobQueue
from .roles import close_roles, connect_roles, warn_if_evicting
from .routing import RouteReason, owner
from .storage import RedisMediaStore, RedisVideoRegistry

log = logging.getLogger(__name__)

CARD_CACHE_SECONDS = 2.0
LEASE_SECONDS = 5.0  # a request's lease: renewed every second while this process relays it
LEASE_RENEW_SECONDS = 1.0
LOST_AFTER_SECONDS = 5.0  # neither job nor events in Redis for this long: a restart lost the request
NO_WORKER_GRACE_SECONDS = 3.0  # a live worker re-advertises itself every 2 s at most


@redis_backend
class RedisEngine:
    def __init__(self, redis: Redis, settings: Settings, metrics: LlamaVidMetrics, *,
                 cache_redis: Redis | None = None) -> None:
        ns = settings.redis_namespace
        self.redis = redis  # queues, job state, media (roles.py)
        self.cache_redis = redis if cache_redis is None else cache_redis  # feature blobs
        self.settings = settings
        self.metrics = metrics
        self.queue = RedisJobQueue(redis, ns, event_ttl=int(settings.request_timeout) + 600)
        self.registry = RedisVideoRegistry(redis, ns, settings.cache_ttl_seconds)
        self.media = RedisMediaStore(redis, ns, settings.cache_ttl_seconds)
        self._cards: tuple[float, list[dict]] = (0.0, [])
        self._last_card: ModelCard | None = None

    async def _workers(self) -> list[dict]:
        stamp, cards = self._cards
        if cards and time.monotonic() - stamp < CARD_CACHE_SECONDS:
            return cards
        cards = await self.queue.live_workers()
        self._cards = (time.monotonic(), cards)
        return cards

    async def _workers_or_wait(self) -> list[dict]:
        """The live workers; when there are none, wait a few heartbeats before believing it: after a
        Redis restart their advertisements are gone until each one's next heartbeat."""
        deadline = time.monotonic() + NO_WORKER_GRACE_SECONDS
        while not (workers := await self._workers()) and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
        return workers

    async def model_card(self) -> ModelCard | None:
        cards = await self._workers()
        if not cards:
            # Every worker is gone: keep describing the model they served, so that a question
            # reaches ask() and gets its 503 no_worker (with Retry-After) rather than "not ready".
            return self._last_card
        card = cards[0]
        self._last_card = ModelCard(**{k: card[k] for k in ModelCard.__dataclass_fields__ if k in card})
        return self._last_card

    async def workers(self) -> list[dict]:
        return await self.queue.live_workers()

    async def ready(self) -> dict[str, bool]:
        try:
            cache = bool(await self.redis.ping()) and bool(await self.cache_redis.ping())
        except Exception:
            return {"model": False, "cache": False}
        self._cards = (0.0, [])
        return {"model": bool(await self._workers()), "cache": cache}

    def _dead_after_ms(self) -> int:
        return int(self.settings.visibility_timeout * 1000)

    async def _enqueue(self, queue: str, payload: str, digest: str | None, *, affine_limit: int,
                       shared_limit: int) -> tuple[str, str] | None:
        """Put a job on its video owner's stream (``routing.py``), or on the shared one: (stream key,
        entry id), or None when the shared stream is full too. The choice is counted by reason."""
        reason: RouteReason = "shared" if self.settings.routing == "shared" else "no_media"
        if reason != "shared" and digest is not None:
            target = owner(digest, [w["worker_id"] for w in await self._workers() if "worker_id" in w])
            reason = "owner_gone"
            if target is not None:
                entry, status = await self.queue.enqueue_to_worker(queue, target, payload, affine_limit)
                if entry is not None:
                    self.metrics.routed(queue, "affine")
                    return self.queue.stream(queue, target), entry
                reason = "owner_busy" if status == "busy" else "owner_gone"
        entry = await self.queue.enqueue_bounded(queue, payload, shared_limit, self._dead_after_ms())
        self.metrics.set_queue_depth(queue, await self.queue.depth(self.queue.stream(queue)))
        if entry is None:
            return None
        self.metrics.routed(queue, reason)
        return self.queue.stream(queue), entry

    async def extract(self, job: VideoJob) -> None:
        # One extraction waiting or running on the owner; past that any idle worker starts it.
        if await self._enqueue(VIDEOS, job.model_dump_json(), job.digest, affine_limit=1,
                               shared_limit=self.settings.video_queue_size) is None:
            raise QueueFull("videos", retry_after=10)

    async def ask(self, job: QuestionJob) -> EventStream:
        workers = await self._workers_or_wait()
        if not workers:
            raise EngineUnavailable("no GPU worker is running", code="no_worker")
        if job.sampling.seed is None:
            # A reclaimed job is replayed from the start; with the same seed it samples the same text.
            job.sampling.seed = random.randrange(1 << 31)
        await self.queue.renew_lease(job.request_id, LEASE_SECONDS)
        queued = await self._enqueue(
            QUESTIONS, job.model_dump_json(), job.routing_digest,
            affine_limit=self.settings.affinity_queue_depth,
            shared_limit=self.settings.queue_size + self.settings.max_running * len(workers))
        if queued is None:
            raise QueueFull("questions", retry_after=2)
        stream = EventStream(on_cancel=lambda: _stop_relay(stream))
        stream.task = asyncio.ensure_future(self._relay(job, queued, stream))
        return stream

    async def _relay(self, job: QuestionJob, queued: tuple[str, str], stream: EventStream) -> None:
        """Forward the worker's events to the client: each attempt's answer text is rebuilt from the
        deltas' offsets, and only what the client does not have yet is forwarded."""
        last, attempt = "0-0", 0
        answers: dict[int, _Relayed] = {}  # per answer index: what the client has
        relevance_sent, finished = False, False
        deadline = job.deadline + 30
        renewed, lost_since = time.monotonic(), None
        try:
            while not stream.cancelled and not finished:
                if time.time() > deadline:
                    stream.put(ErrorEvent(status=504, code="timeout",
                                          message="no worker finished the request in time"))
                    break
                try:
                    if time.monotonic() - renewed >= LEASE_RENEW_SECONDS:
                        await self.queue.renew_lease(job.request_id, LEASE_SECONDS)
                        renewed = time.monotonic()
                        # A Redis that restarted empty lost the job and its events: nothing will come.
                        alive = await self.queue.request_alive(*queued, job.request_id)
                        lost_since = None if alive else (lost_since or time.monotonic())
                        if lost_since is not None and time.monotonic() - lost_since > LOST_AFTER_SECONDS:
                            stream.put(ErrorEvent(status=503, code="backend_restarted", message=(
                                "the request was lost when the queue backend (Redis) restarted; "
                                "send it again")))
                            break
                    batch = await self.queue.read_events(job.request_id, last, block_ms=250)
                except Exception as exc:  # Redis went away mid-answer
                    log.warning("lost the event stream of %s: %s", job.request_id, exc)
                    await asyncio.sleep(0.5)
                    continue
                for entry, event_attempt, event in batch:
                    last = entry
                    if event_attempt < attempt:
                        continue  # a worker that was presumed dead; its replacement owns the request
                    if event_attempt > attempt:
                        attempt = event_attempt
                        for relayed in answers.values():
                            relayed.replay = ""
                    match event:
                        case DeltaEvent():
                            forward = answers.setdefault(event.index, _Relayed()).take(event)
                            if isinstance(forward, ErrorEvent):
                                finished = True
                                stream.put(forward)
                                break
                            if forward is not None:
                                stream.put(forward)
                        case RelevanceEvent():
                            if not relevance_sent:
                                relevance_sent = True
                                stream.put(event)
                        case ProgressEvent():
                            # an extraction or transcription making progress does not use up the
                            # answer's time (the worker moves its deadline the same way)
                            deadline = max(deadline, time.time() + (job.deadline - job.arrival_time) + 30)
                            stream.put(event)
                        case DoneEvent() | ErrorEvent():
                            stream.put(event)
                            finished = True
                    if finished:
                        break
        finally:
            if not finished:
                try:
                    await self.queue.cancel(job.request_id)
                except Exception:
                    pass
            stream.close()

    async def forget_features(self, digest: str) -> None:
        await delete_video_keys(self.cache_redis, self.settings.redis_namespace, digest)

    async def close(self) -> None:
        await close_roles(self.redis, self.cache_redis)


class _Relayed:
    """One answer as relayed: the text the client has, the current attempt's text rebuilt from its
    deltas' offsets, the log-probabilities sent, whether its end was sent. A worker's retry resends
    the answer from the start; only what the client lacks goes on, and a retry that disagrees with
    what was sent is an error rather than a spliced answer."""

    def __init__(self) -> None:
        self.sent = self.replay = ""
        self.tokens_sent = 0
        self.finished = False

    def take(self, event: DeltaEvent) -> DeltaEvent | ErrorEvent | None:
        if event.offset > len(self.replay):
            return ErrorEvent(status=502, code="events_lost", message=(
                "part of the answer was lost in a queue backend (Redis) outage; send the request again"))
        self.replay = self.replay[: event.offset] + event.text  # offset < len: a resend of text already relayed
        common = min(len(self.replay), len(self.sent))
        if self.replay[:common] != self.sent[:common]:
            return ErrorEvent(status=502, code="worker_failed", message=(
                "the worker answering this request failed and its retry produced a different answer"))
        text = self.replay[len(self.sent):]
        logprobs = None
        if event.logprobs is not None:
            logprobs = event.logprobs[max(0, self.tokens_sent - event.token_offset):]
        finish = event.finish_reason if not self.finished else None
        if not text and not logprobs and finish is None:
            return None
        forward = DeltaEvent(text=text, offset=len(self.sent), index=event.index, logprobs=logprobs,
                             token_offset=self.tokens_sent, finish_reason=finish)
        self.sent += text
        self.tokens_sent = max(self.tokens_sent, event.token_offset + len(event.logprobs or ()))
        self.finished = self.finished or finish is not None
        return forward


def _stop_relay(stream: EventStream) -> None:
    """The client is gone: stop relaying now (the relay's ``finally`` flags the job for its worker)
    rather than when the relay's blocking read next returns."""
    if stream.task is not None and not stream.task.done():
        stream.task.cancel()


async def redis_engine_factory(settings: Settings, metrics: LlamaVidMetrics) -> RedisEngine:
    redis, cache_redis = connect_roles(settings)
    await warn_if_evicting(redis)
    return RedisEngine(redis, settings, metrics, cache_redis=cache_redis)
