"""The embedded engine of ``llamavid serve``: the worker runs in the HTTP process, queues are counters.

Also the engine of in-process tools (``llamavid eval-demo``), so what they measure is the path
the service runs.
"""

from __future__ import annotations

import asyncio
import logging

from cache import MemoryFeatureStore

from ..engine.events import AnyEvent
from ..engine.jobs import QuestionJob, VideoJob
from ..engine.protocol import EventStream, ModelCard, QueueFull
from ..engine.storage import DiskMediaStore, MediaStore, MemoryVideoRegistry, VideoRegistry
from ..metrics import LlamaVidMetrics
from ..settings import Settings
from .cache_metrics import CacheMetrics
from .loading import load_model
from .runner import ModelRunner

log = logging.getLogger(__name__)


class LocalEngine:
    def __init__(
        self,
        runner: ModelRunner,
        card: ModelCard,
        registry: VideoRegistry,
        media: MediaStore,
        metrics: LlamaVidMetrics,
        *,
        queue_size: int,
        max_running: int,
        video_queue_size: int,
    ) -> None:
        self.runner = runner
        self.card = card
        self.registry = registry
        self.media = media
        self.metrics = metrics
        self._question_limit = queue_size + max_running
        self._video_limit = video_queue_size
        self._questions = 0
        self._videos: set[asyncio.Task] = set()
        self._extract_slots = asyncio.Semaphore(1)

    async def model_card(self) -> ModelCard:
        return self.card

    async def workers(self) -> list[dict]:
        return []  # the model runs in this process: its metrics are the API's

    async def ready(self) -> dict[str, bool]:
        return {"model": True, "cache": await self.runner.store.ping()}

    async def extract(self, job: VideoJob) -> None:
        if len(self._videos) >= self._video_limit:
            raise QueueFull("videos", retry_after=10)
        task = asyncio.ensure_future(self._extract(job))
        self._videos.add(task)
        self.metrics.set_queue_depth("videos", len(self._videos))
        task.add_done_callback(self._video_done)

    def _video_done(self, task: asyncio.Task) -> None:
        self._videos.discard(task)
        self.metrics.set_queue_depth("videos", len(self._videos))

    async def _extract(self, job: VideoJob) -> None:
        async with self._extract_slots:  # one extraction at a time; questions interleave with it
            await self.runner.extract(job)

    async def ask(self, job: QuestionJob) -> EventStream:
        """Admit the question (or raise ``QueueFull``) and start answering it."""
        if self._questions >= self._question_limit:
            raise QueueFull("questions", retry_after=2)
        self._questions += 1
        self.metrics.set_queue_depth("questions", self._questions)
        stream = EventStream()
        stream.task = asyncio.ensure_future(self._answer(job, stream))
        return stream

    async def _answer(self, job: QuestionJob, stream: EventStream) -> None:
        async def emit(event: AnyEvent) -> None:
            stream.put(event)

        try:
            await self.runner.answer(job, emit, lambda: stream.cancelled)
        finally:
            stream.close()
            self._questions -= 1
            self.metrics.set_queue_depth("questions", self._questions)

    async def forget_features(self, digest: str) -> None:
        await self.runner.store.delete_video(digest)

    async def close(self) -> None:
        for task in list(self._videos):
            task.cancel()
        self.runner.close()


async def local_engine_factory(settings: Settings, metrics: LlamaVidMetrics) -> LocalEngine:
    """Model, in-memory feature cache, media folder and video registry, all in this process."""
    model, card, plan = await asyncio.to_thread(load_model, settings)
    store = MemoryFeatureStore(settings.cache_bytes)
    cache_metrics = CacheMetrics(metrics, store)
    registry = MemoryVideoRegistry()
    media = DiskMediaStore(settings.media_dir, settings.media_bytes)
    runner = ModelRunner(model, store, media, registry, metrics, num_blocks=plan.num_blocks,
                         block_size=plan.block_size, prefill_chunk=settings.prefill_chunk,
                         max_running=settings.max_running, encode_batch=settings.encode_batch,
                         template=settings.template, on_cache_access=cache_metrics.sync,
                         asr_model=settings.asr_model)
    await runner.start()
    metrics.set_model_info(card.id, card.dtype, card.device, card.demo is not None)
    log.info("ready: %s on %s (%s), %d tokens per frame", card.id, card.device, card.dtype,
             card.tokens_per_frame)
    return LocalEngine(runner, card, registry, media, metrics, queue_size=settings.queue_size,
                       max_running=settings.max_running, video_queue_size=settings.video_queue_size)
