"""``llamavid worker``: a GPU worker of the split deployment.

Loads the model, then consumes two Redis streams (questions and video extractions, so a long
extraction never holds up questions about cached videos), runs each job with ``ModelRunner``
and streams its events back. Features go through a worker-local hot tier (host memory, or GPU
memory when there is one) in front of the shared Redis cache, so repeated questions about a
video this worker has seen move no feature bytes over the network. A heartbeat key advertises
the worker and its model; jobs in progress are kept fresh, and jobs of dead workers reclaimed.
Every Redis failure is retried: the worker outlives a Redis restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import uuid

from redis.asyncio import Redis

from cache import MemoryFeatureStore, RedisFeatureStore, TieredFeatureStore

from ..engine.events import AnyEvent, ErrorEvent
from ..engine.jobs import QuestionJob, VideoJob
from ..engine.redis.queue import QUESTIONS, VIDEOS, RedisJobQueue, encode_card
from ..engine.redis.storage import RedisMediaStore, RedisVideoRegistry
from ..metrics import LlamaVidMetrics
from ..settings import Settings
from .cache_metrics import CacheMetrics
from .loading import load_model, resolve_device
from .runner import ModelRunner

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 2.0


class Worker:
    def __init__(self, settings: Settings, redis: Redis, runner: ModelRunner, card, metrics: LlamaVidMetrics) -> None:
        self.settings = settings
        self.redis = redis
        self.runner = runner
        self.card = card
        self.metrics = metrics
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.queue = RedisJobQueue(redis, settings.redis_namespace, event_ttl=int(settings.request_timeout) + 600)
        self.inflight: dict[str, set[str]] = {QUESTIONS: set(), VIDEOS: set()}
        self.slots = {QUESTIONS: asyncio.Semaphore(settings.max_running + 2), VIDEOS: asyncio.Semaphore(1)}
        self.lost: set[str] = set()  # entries another worker reclaimed from this one
        self.stopping = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        loops = [self._heartbeat(), self._consume(QUESTIONS), self._consume(VIDEOS),
                 self._reclaim(QUESTIONS), self._reclaim(VIDEOS)]
        runners = [asyncio.ensure_future(loop) for loop in loops]
        await self.stopping.wait()
        for task in runners:
            task.cancel()
        if self.tasks:  # let jobs in progress finish briefly; unfinished ones are reclaimed by others
            await asyncio.wait(self.tasks, timeout=10)
        await self._retry(lambda: self.queue.retire(self.id), once=True)

    async def _retry(self, action, *, once: bool = False):
        while True:
            try:
                return await action()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if once:
                    return None
                log.warning("redis unavailable (%s); retrying", exc)
                await asyncio.sleep(1.0)

    async def _heartbeat(self) -> None:
        """Advertise this worker and keep its jobs fresh; stop jobs another worker took over."""
        # Jobs in progress must be refreshed well within the visibility timeout, or live jobs look dead.
        interval = min(HEARTBEAT_SECONDS, self.settings.visibility_timeout / 3)
        card = encode_card(self.card)
        while True:
            try:
                await self.queue.advertise(self.id, card, ttl=3 * HEARTBEAT_SECONDS)
                for queue, ids in self.inflight.items():
                    mine = await self.queue.owned(queue, self.id, set(ids))
                    # A job reclaimed by another worker while this one stalled is theirs now:
                    # refreshing it would steal it back, so stop working on it instead.
                    self.lost |= set(ids) - mine
                    await self.queue.touch(queue, self.id, sorted(mine))
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(interval)

    async def _consume(self, queue: str) -> None:
        while True:
            await self.slots[queue].acquire()
            try:
                entries = await self.queue.read(queue, self.id, count=1, block_ms=1000)
            except Exception as exc:
                self.slots[queue].release()
                log.warning("reading %s failed: %s", queue, exc)
                await asyncio.sleep(1.0)
                continue
            if not entries:
                self.slots[queue].release()
                continue
            self._start(queue, *entries[0])

    async def _reclaim(self, queue: str) -> None:
        idle_ms = int(self.settings.visibility_timeout * 1000)
        while True:
            await asyncio.sleep(max(0.5, self.settings.visibility_timeout / 4))
            if self.slots[queue].locked():
                continue
            try:
                entries = await self.queue.reclaim(queue, self.id, idle_ms, count=1)
            except Exception as exc:
                log.warning("reclaiming %s failed: %s", queue, exc)
                continue
            for entry_id, payload in entries:
                if entry_id in self.inflight[queue]:
                    continue  # its own job, still running: the refresh was late, the worker is alive
                log.warning("reclaimed %s job %s from a worker that stopped", queue, entry_id)
                await self.slots[queue].acquire()
                self._start(queue, entry_id, payload)

    def _start(self, queue: str, entry_id: str, payload: str) -> None:
        self.inflight[queue].add(entry_id)
        task = asyncio.ensure_future(self._run(queue, entry_id, payload))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, queue: str, entry_id: str, payload: str) -> None:
        try:
            if queue == VIDEOS:
                await self.runner.extract(VideoJob.model_validate_json(payload))
            else:
                await self._answer(QuestionJob.model_validate_json(payload), entry_id)
        except Exception:
            log.exception("job %s on %s failed", entry_id, queue)
        try:
            if entry_id not in self.lost:  # a reclaimed job is acknowledged by its new owner
                await self._retry(lambda: self.queue.ack(queue, entry_id))
        finally:
            self.inflight[queue].discard(entry_id)
            self.lost.discard(entry_id)
            self.slots[queue].release()

    async def _answer(self, job: QuestionJob, entry_id: str) -> None:
        attempt = await self._retry(lambda: self.queue.start_attempt(job.request_id))

        async def emit(event: AnyEvent) -> None:
            await self._retry(lambda: self.queue.emit(job.request_id, attempt, event))

        async def cancelled() -> bool:
            if entry_id in self.lost:
                return True
            try:
                return await self.queue.cancelled(job.request_id)
            except Exception:
                return False

        try:
            await self.runner.answer(job, emit, cancelled)
        except Exception as exc:
            await emit(ErrorEvent(status=500, code="internal_error", message=f"internal error: {exc}"))
            raise


def run_worker(settings: Settings) -> int:
    return asyncio.run(_main(settings))


async def _main(settings: Settings) -> int:
    metrics = LlamaVidMetrics()
    metrics.serve_http(settings.worker_metrics_port)
    redis = Redis.from_url(settings.redis_url, socket_timeout=30, health_check_interval=10)
    model, card = await asyncio.to_thread(load_model, settings)
    device = resolve_device(settings.device)
    hot = MemoryFeatureStore(settings.cache_bytes, device=device if device.type == "cuda" else None)
    cold = RedisFeatureStore(redis, namespace=settings.redis_namespace, ttl_seconds=settings.cache_ttl_seconds,
                             fmt=settings.feature_format)
    store = TieredFeatureStore(hot, cold)
    cache_metrics = CacheMetrics(metrics, store)
    runner = ModelRunner(
        model, store, RedisMediaStore(redis, settings.redis_namespace, settings.cache_ttl_seconds),
        RedisVideoRegistry(redis, settings.redis_namespace, settings.cache_ttl_seconds), metrics,
        max_running=settings.max_running, encode_batch=settings.encode_batch, batch_capacity=settings.batch_capacity, template=settings.template,
        stall_timeout=settings.visibility_timeout, on_cache_access=cache_metrics.sync,
    )
    await runner.start()
    metrics.set_model_info(card.id, card.dtype, card.device, card.demo is not None)
    worker = Worker(settings, redis, runner, card, metrics)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stopping.set)
    log.info("worker %s ready: %s on %s; consuming %s", worker.id, card.id, card.device, settings.redis_url)
    await worker.run()
    runner.close()
    await redis.aclose()
    return 0
