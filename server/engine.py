"""What the HTTP routes talk to: the ``EngineClient`` interface and its in-process implementation.

Routes never see the model, the queue or the cache. They hand a ``QuestionJob`` to
``engine.ask`` and relay the events it yields, and hand a ``VideoJob`` to ``engine.extract``.
``LocalEngine`` runs the worker in this process (``llamavid serve``); ``RedisEngine``
(``server.redis_engine``) sends the same jobs to separate worker processes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from .jobs import Event, QuestionJob, VideoJob
from .metrics import LlamaVidMetrics
from .storage import MediaStore, VideoRegistry
from .worker.runner import ModelRunner

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Admission refused: the queue is at its bound. Routes answer 429 with Retry-After."""

    def __init__(self, queue: str, retry_after: int = 1) -> None:
        super().__init__(f"the {queue} queue is full; retry later")
        self.queue, self.retry_after = queue, retry_after


@dataclass(frozen=True)
class ModelCard:
    id: str
    path: str
    demo: str | None  # None, "random" (answers are noise) or "trained" (the synthetic-shapes demo)
    tokens_per_frame: int
    context_length: int
    device: str
    dtype: str


class EventStream:
    """One question's events, in order. Leaving the iteration early cancels the generation:
    the worker sees the flag before its next decode step."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self.cancelled = False
        self.task: asyncio.Future | None = None

    async def put(self, event: Event) -> None:
        self._queue.put_nowait(event)

    def close(self) -> None:
        self._queue.put_nowait(None)

    def cancel(self) -> None:
        self.cancelled = True

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            while (event := await self._queue.get()) is not None:
                yield event
        finally:
            self.cancelled = True


class EngineClient(Protocol):
    registry: VideoRegistry
    media: MediaStore

    async def model_card(self) -> ModelCard | None: ...
    async def ready(self) -> dict[str, bool]: ...
    async def extract(self, job: VideoJob) -> None: ...
    async def ask(self, job: QuestionJob) -> EventStream: ...
    async def forget_features(self, digest: str) -> None: ...
    async def close(self) -> None: ...


class LocalEngine:
    """The embedded engine: the worker runs in this process, the queues are counters."""

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

    async def _answer(self, job: QuestionJob, stream: "EventStream") -> None:
        try:
            await self.runner.answer(job, stream.put, lambda: stream.cancelled)
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
