"""The in-process engine driven from synchronous code, without HTTP.

``llamavid eval-demo`` and ``bench/demo_eval.py`` answer through this, so the accuracy they
publish is the served path: the media store, the extraction loop writing the feature cache, the
runner, its per-request text state and the batched decoder, all exactly as ``llamavid serve``
runs them; only the HTTP layer (validation, SSE) is left out. The engine runs on an event loop
of its own in a background thread; each call blocks until its answer is complete.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from cache import FeatureStore, MemoryFeatureStore
from cache.keys import digest_bytes
from model.llama_vid import LlamaVid
from model.memory import host_memory_bytes, plan_memory

from ..engine.events import DeltaEvent, ErrorEvent
from ..engine.jobs import Grammar, MediaRef, QuestionJob, Sampling, SamplingParams, Turn, new_id
from ..engine.storage import DiskMediaStore, MemoryVideoRegistry
from ..metrics import LlamaVidMetrics
from .loading import describe
from .local import LocalEngine
from .runner import ModelRunner

T = TypeVar("T")


class OfflineEngine:
    def __init__(self, model: LlamaVid, *, store: FeatureStore | None = None, fps: float = 1.0,
                 max_frames: int | None = None, timeout: float = 600.0,
                 kv_cache_bytes: int = 1 << 30) -> None:
        self.sampling = Sampling(fps=fps, max_frames=max_frames)
        self.timeout = timeout
        self._media_dir = tempfile.TemporaryDirectory(prefix="llamavid-offline-")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="llamavid-offline", daemon=True)
        self._thread.start()
        self.engine = self._run(self._start(model, store or MemoryFeatureStore(4 << 30), kv_cache_bytes))

    async def _start(self, model: LlamaVid, store: FeatureStore, kv_cache_bytes: int) -> LocalEngine:
        metrics = LlamaVidMetrics()
        registry = MemoryVideoRegistry()
        media = DiskMediaStore(self._media_dir.name, 8 << 30)
        plan = plan_memory(model.config, device_bytes=host_memory_bytes(), dtype=model.dtype,
                           kv_cache_bytes=kv_cache_bytes)
        runner = ModelRunner(model, store, media, registry, metrics, num_blocks=plan.num_blocks,
                             block_size=plan.block_size)
        await runner.start()
        card = describe(model, model.config.model_dir, plan)
        return LocalEngine(runner, card, registry, media, metrics, queue_size=64, max_running=8,
                           video_queue_size=16)

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def read(self, path: str | Path) -> MediaRef:
        """Store a video's bytes; its first question extracts (and caches) its features."""
        data = Path(path).read_bytes()
        digest = digest_bytes(data)
        self._run(self.engine.media.put(digest, data))
        return MediaRef(kind="video", digest=digest, sampling=self.sampling)

    def answer(self, clip: MediaRef, question: str, *, max_tokens: int = 8, schema: dict | None = None) -> str:
        """A greedy answer through ``LocalEngine.ask`` (under ``schema``, a JSON schema, when given);
        an error event raises ``RuntimeError``."""
        now = time.time()
        grammar = None
        if schema is not None:
            from model.structured import GrammarSpec  # the grammar library loads only when an answer needs it

            grammar = Grammar(**GrammarSpec.json_schema(schema).to_dict())
        sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, grammar=grammar)
        job = QuestionJob(request_id=new_id("req"), messages=[Turn(role="user", content=question)],
                          media=clip, sampling=sampling, arrival_time=now, deadline=now + self.timeout)
        return self._run(self._answer(job))

    async def _answer(self, job: QuestionJob) -> str:
        parts = []
        async for event in await self.engine.ask(job):
            if isinstance(event, DeltaEvent):
                parts.append(event.text)
            elif isinstance(event, ErrorEvent):
                raise RuntimeError(f"{event.code}: {event.message}")
        return "".join(parts)

    def close(self) -> None:
        self._run(self.engine.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._media_dir.cleanup()

    def __enter__(self) -> OfflineEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
