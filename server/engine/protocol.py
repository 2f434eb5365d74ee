"""What the HTTP routes talk to: the ``EngineClient`` interface, the model card, admission errors.

Routes never see the model, the queue or the cache. They hand a ``QuestionJob`` to ``ask`` and
relay the events of the ``EventStream`` it returns, and hand a ``VideoJob`` to ``extract``. Two
implementations: ``server.worker.local.LocalEngine`` runs the worker in the same process
(``llamavid serve``); ``server.engine.redis.client.RedisEngine`` sends the same jobs to GPU
worker processes (``llamavid api``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from .events import AnyEvent
from .jobs import QuestionJob, VideoJob
from .storage import MediaStore, VideoRegistry


class QueueFull(Exception):
    """Admission refused: the queue is at its bound. The API answers 429 with Retry-After."""

    def __init__(self, queue: str, retry_after: int = 1) -> None:
        super().__init__(f"the {queue} queue is full; retry later")
        self.queue, self.retry_after = queue, retry_after


class EngineUnavailable(Exception):
    """Nothing can take the request right now (no worker, a backend down): 503 with Retry-After."""

    def __init__(self, message: str, code: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.message, self.code, self.retry_after = message, code, retry_after


@dataclass(frozen=True)
class ModelCard:
    id: str
    path: str
    demo: str | None  # None, "random" (answers are noise) or "trained" (the synthetic-shapes demo)
    tokens_per_frame: int
    context_length: int
    device: str
    dtype: str
    kv_positions: int  # what one question can use at most: the KV cache's positions (less a padding block)
    long_video: bool = False  # a stage-3 long-video checkpoint: movie framing, subtitles on by default
    asr: bool = False  # the worker can transcribe a video's speech when it has no subtitles


class EventStream:
    """One question's events, in order. Cancelling it (or leaving the iteration early) stops the
    generation: the engine checks the flag before every decode step. ``on_cancel`` runs once, at
    once, for an engine that must tell another process (the Redis engine sets the request's cancel
    key rather than waiting for its relay loop to notice)."""

    def __init__(self, on_cancel: Callable[[], None] | None = None) -> None:
        self._queue: asyncio.Queue[AnyEvent | None] = asyncio.Queue()
        self._on_cancel = on_cancel
        self.cancelled = False
        self.task: asyncio.Future | None = None

    def put(self, event: AnyEvent) -> None:
        self._queue.put_nowait(event)

    def close(self) -> None:
        self._queue.put_nowait(None)

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            if self._on_cancel is not None:
                self._on_cancel()

    async def __aiter__(self) -> AsyncIterator[AnyEvent]:
        try:
            while (event := await self._queue.get()) is not None:
                yield event
        finally:
            self.cancel()


class EngineClient(Protocol):
    registry: VideoRegistry
    media: MediaStore

    async def model_card(self) -> ModelCard | None: ...
    async def ready(self) -> dict[str, bool]: ...
    async def workers(self) -> list[dict]: ...  # the cards of separate worker processes (none embedded)
    async def extract(self, job: VideoJob) -> None: ...
    async def ask(self, job: QuestionJob) -> EventStream: ...
    async def forget_features(self, digest: str) -> None: ...
    async def close(self) -> None: ...
