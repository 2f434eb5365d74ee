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

from cache import RedisFeatureStore

from .engine import EventStream, ModelCard, QueueFull
from .errors import APIError
from .jobs import Event, QuestionJob, VideoJob, error_event
from .metrics import LlamaVidMetrics
from .redis_backends import RedisMediaStore, RedisVideoRegistry
from .redis_queue import QUESTIONS, VIDEOS, RedisJobQueue
from .settings import Settings

log = logging.getLogger(__name__)

CARD_CACHE_SECONDS = 2.0


class RedisEngine:
    def __init__(self, redis: Redis, settings: Settings, metrics: LlamaVidMetrics) -> None:
        ns = settings.redis_namespace
        self.redis = redis
        self.settings = settings
        self.metrics = metrics
        self.queue = RedisJobQueue(redis, ns, event_ttl=int(settings.request_timeout) + 600)
        self.registry = RedisVideoRegistry(redis, ns, settings.cache_ttl_seconds)
        self.media = RedisMediaStore(redis, ns, settings.cache_ttl_seconds)
        self.features = RedisFeatureStore(redis, namespace=ns, ttl_seconds=settings.cache_ttl_seconds)
        self._cards: tuple[float, list[dict]] = (0.0, [])
        self._last_card: ModelCard | None = None

    async def _workers(self) -> list[dict]:
        stamp, cards = self._cards
        if time.monotonic() - stamp < CARD_CACHE_SECONDS:
            return cards
        cards = await self.queue.live_workers()
        self._cards = (time.monotonic(), cards)
        return cards

    async def model_card(self) -> ModelCard | None:
        try:
            cards = await self._workers()
        except Exception:  # Redis down: no model known right now
            return None
        if not cards:
            # Every worker is gone: keep describing the model they served, so that a question
            # reaches ask() and gets its 503 no_worker (with Retry-After) rather than "not ready".
            return self._last_card
        card = cards[0]
        self._last_card = ModelCard(**{k: card[k] for k in ModelCard.__dataclass_fields__})
        return self._last_card

    async def ready(self) -> dict[str, bool]:
        try:
            cache = bool(await self.redis.ping())
        except Exception:
            return {"model": False, "cache": False}
        self._cards = (0.0, [])
        return {"model": bool(await self._workers()), "cache": cache}

    async def extract(self, job: VideoJob) -> None:
        if await self.queue.enqueue_bounded(VIDEOS, job.to_json(), self.settings.video_queue_size) is None:
            raise QueueFull("videos", retry_after=10)
        self.metrics.set_queue_depth("videos", await self.queue.depth(VIDEOS))

    async def ask(self, job: QuestionJob) -> EventStream:
        workers = await self._workers()
        if not workers:
            raise APIError(503, "no GPU worker is running", code="no_worker", headers={"Retry-After": "5"})
        limit = self.settings.queue_size + self.settings.max_running * len(workers)
        if job.params.get("seed") is None:
            # A reclaimed job is replayed from the start; with the same seed it samples the same text.
            job.params["seed"] = random.randrange(1 << 31)
        admitted = await self.queue.enqueue_bounded(QUESTIONS, job.to_json(), limit)
        self.metrics.set_queue_depth("questions", await self.queue.depth(QUESTIONS))
        if admitted is None:
            raise QueueFull("questions", retry_after=2)
        stream = EventStream()
        stream.task = asyncio.ensure_future(self._relay(job, stream))
        return stream

    async def _relay(self, job: QuestionJob, stream: EventStream) -> None:
        last, attempt, sent, replay = "0-0", 0, "", ""
        relevance_sent, finished = False, False
        deadline = (job.deadline or time.time() + self.settings.request_timeout) + 30
        try:
            while not stream.cancelled and not finished:
                if time.time() > deadline:
                    await stream.put(error_event(504, "timeout", "no worker finished the request in time"))
                    break
                try:
                    batch = await self.queue.read_events(job.request_id, last, block_ms=250)
                except Exception as exc:  # Redis went away mid-answer
                    log.warning("lost the event stream of %s: %s", job.request_id, exc)
                    await asyncio.sleep(0.5)
                    continue
                for entry_id, event_attempt, event in batch:
                    last = entry_id
                    if event_attempt < attempt:
                        continue  # a worker that was presumed dead; its replacement owns the request
                    if event_attempt > attempt:
                        attempt, replay = event_attempt, ""
                    if event.type == "delta":
                        replay += event.data["text"]
                        common = min(len(replay), len(sent))
                        if replay[:common] != sent[:common]:
                            await stream.put(error_event(502, "worker_failed", "the worker answering this request "
                                                         "failed and its retry produced a different answer"))
                            finished = True
                            break
                        if len(replay) > len(sent):
                            new = replay[len(sent):]
                            sent += new
                            await stream.put(Event("delta", {"text": new}))
                    elif event.type == "relevance":
                        if not relevance_sent:
                            relevance_sent = True
                            await stream.put(event)
                    else:
                        await stream.put(event)
                        finished = event.type in ("done", "error")
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
        await self.features.delete_video(digest)

    async def close(self) -> None:
        await self.redis.aclose()


async def redis_engine_factory(settings: Settings, metrics: LlamaVidMetrics) -> RedisEngine:
    redis = Redis.from_url(settings.redis_url, socket_timeout=30, health_check_interval=10)
    return RedisEngine(redis, settings, metrics)
