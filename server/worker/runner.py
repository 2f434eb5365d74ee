"""The GPU worker's job logic: extract a video's features, answer a question, emit its events.

The same class runs inside ``llamavid serve`` and inside each ``llamavid worker``; only where
jobs come from and where events go differs. A question's tokens come from ``Decoding`` and are
turned into text by the model's own ``Generation`` state (detokenizer, stop strings, EOS,
length: the loop ``LlamaVid.stream`` runs for the CLI and the evaluation). Every admitted
question ends with a ``done`` or an ``error`` event, unless the client went away.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

import numpy as np
import torch

from cache import FeatureStore
from model.conversation import Message, get_template
from model.llama_vid import LlamaVid, PreparedPrompt, VisualInput

from ..engine.events import DeltaEvent, DoneEvent, ErrorEvent, FrameRelevance, RelevanceEvent
from ..engine.jobs import JOB_VERSION, QuestionJob, VideoJob
from ..engine.protocol import EngineUnavailable
from ..engine.storage import MediaStore, VideoRegistry
from ..metrics import LlamaVidMetrics, LlamaVidRequestMetrics
from .decoding import DecodeFailure, Scheduler
from .features import Emit, FeatureSource, JobError
from .model_thread import ModelThread

log = logging.getLogger(__name__)

CancelFlag = Callable[[], bool | Awaitable[bool]]  # a plain flag in-process, a Redis lookup when split
T = TypeVar("T")


class ModelRunner:
    def __init__(
        self,
        model: LlamaVid,
        store: FeatureStore,
        media: MediaStore,
        registry: VideoRegistry,
        metrics: LlamaVidMetrics,
        *,
        num_blocks: int,
        block_size: int = 16,
        prefill_chunk: int = 2048,
        max_running: int = 8,
        encode_batch: int = 32,
        stall_timeout: float = 60.0,
        template: str = "vicuna_v1",
        on_cache_access: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        self.store = store
        self.metrics = metrics
        self.template = template
        self.thread = ModelThread()
        self.features = FeatureSource(model, store, media, registry, metrics, self.thread,
                                      encode_batch=encode_batch, stall_timeout=stall_timeout,
                                      on_cache_access=on_cache_access or (lambda: None))
        self.scheduler = Scheduler(model, self.thread, metrics, num_blocks=num_blocks, block_size=block_size,
                                   prefill_chunk=prefill_chunk, max_running=max_running)

    async def start(self) -> None:
        """Warm up (so the first user does not pay for lazy initialisation) and allocate the KV cache."""
        await self.thread(warmup, self.model)
        await self.scheduler.start()

    def close(self) -> None:
        self.scheduler.close()
        self.thread.close()

    async def extract(self, job: VideoJob) -> None:
        await self.features.extract(job)

    async def answer(self, job: QuestionJob, emit: Emit, cancelled: CancelFlag) -> None:
        """Answer one question, emitting progress, relevance, deltas and a final done or error event."""
        if job.version != JOB_VERSION:
            await emit(ErrorEvent(status=500, code="version_mismatch", message=(
                f"the job was written as version {job.version}; this worker reads version {JOB_VERSION}")))
            return
        tracker = self.metrics.track_request(job.arrival_time)
        try:
            with tracker:
                visual, timestamps = await self._visual(job, emit)
                reason = await self._generate(job, visual, timestamps, emit, cancelled, tracker)
                tracker.finish(reason)
        except JobError as exc:
            await emit(exc.event)
        except DecodeFailure as exc:
            await emit(ErrorEvent(status=exc.status, code=exc.code, message=exc.message))
        except EngineUnavailable as exc:  # the media, records or events backend went away mid-question
            await emit(ErrorEvent(status=503, code=exc.code, message=exc.message))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("request %s failed", job.request_id)
            await emit(ErrorEvent(status=500, code="internal_error",
                                  message=f"internal error: {type(exc).__name__}: {exc}"))

    async def _visual(self, job: QuestionJob, emit: Emit) -> tuple[VisualInput | None, list[float]]:
        ref = job.media
        if ref is None:
            return None, []
        if ref.kind == "image":
            return VisualInput(await self.features.image(ref.digest), "image"), [0.0]
        frames, manifest = await self.features.video(ref, emit)
        return VisualInput(frames, "video"), manifest.timestamps

    async def _prepare(self, job: QuestionJob, visual: VisualInput | None):
        messages = [Message(turn.role, turn.content) for turn in job.messages]
        template = get_template(job.template or self.template)
        if job.system is not None:
            template = replace(template, system=job.system)
        s = job.sampling
        try:
            with self.metrics.stage("tokens"):
                prepared = await self.thread(
                    lambda: self.model.prepare(messages, visual, template=template,
                                               with_relevance=job.relevance))
            params = self.model.params(prepared, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                       max_new_tokens=s.max_tokens, stop=s.stop, seed=s.seed)
        except ValueError as exc:
            code = "context_length_exceeded" if "context" in str(exc) else "invalid_request"
            raise JobError(400, code, str(exc)) from exc
        return prepared, params

    async def _generate(self, job: QuestionJob, visual: VisualInput | None, timestamps: list[float],
                        emit: Emit, cancelled: CancelFlag, tracker: LlamaVidRequestMetrics) -> str:
        prepared, params = await self._prepare(job, visual)
        tracker.prompt(prepared.num_prompt_tokens - prepared.num_visual_tokens, prepared.num_visual_tokens)
        if job.relevance and prepared.relevance is not None:
            await emit(RelevanceEvent(frames=relevance_frames(prepared.relevance, timestamps)))
        generation = self.model.generation(params)
        tokens = self.scheduler.open(prepared, params)
        chars = 0  # of answer text emitted so far
        try:
            await _before(job.deadline, tokens.admitted(), "waiting for room in the KV cache")
            tracker.start()
            while True:
                if await _is_set(cancelled):
                    return "abort"
                with self.metrics.stage("prefill" if generation.num_tokens == 0 else "decode_step"):
                    token = await _before(job.deadline, tokens.next(), "generating")
                tracker.token()
                delta = generation.push(token)
                if delta.text:  # the detokenizer holds back partial characters and stop-string prefixes
                    await emit(DeltaEvent(text=delta.text, offset=chars))
                    chars += len(delta.text)
                if delta.finish_reason is not None:
                    await emit(_done(delta.finish_reason, prepared, generation.num_tokens))
                    return delta.finish_reason
        finally:
            await tokens.close()


async def _before(deadline: float, step: Awaitable[T], doing: str) -> T:
    """``step``, unless the request's deadline passes first (then a 408 error event)."""
    try:
        return await asyncio.wait_for(step, timeout=max(0.0, deadline - time.time()))
    except asyncio.TimeoutError:
        raise JobError(408, "timeout", f"the request ran past its deadline while {doing}") from None


async def _is_set(flag: CancelFlag) -> bool:
    value = flag()
    return bool(await value) if inspect.isawaitable(value) else bool(value)


def _done(reason: str, prepared: PreparedPrompt, completion: int) -> DoneEvent:
    return DoneEvent(finish_reason=reason, prompt_tokens=prepared.num_prompt_tokens,
                     visual_tokens=prepared.num_visual_tokens, completion_tokens=completion)


def relevance_frames(scores: torch.Tensor, timestamps: list[float]) -> list[FrameRelevance]:
    """Per-frame relevance: the raw attention score and a softmax over frames (sums to 1)."""
    raw = scores.float()
    weights = torch.softmax(raw, dim=0)
    return [FrameRelevance(index=i, time=round(timestamps[i], 3) if i < len(timestamps) else None,
                           score=round(float(raw[i]), 5), weight=round(float(weights[i]), 6))
            for i in range(len(raw))]


@torch.inference_mode()
def warmup(model: LlamaVid) -> None:
    """One encode + prefill + decode step, so the first user does not pay for lazy initialisation."""
    size = model.processor.crop_size
    frames = np.zeros((2, size, size, 3), dtype=np.uint8)
    features = model.encode_frames(model.preprocess(frames))
    prepared = model.prepare([Message("user", "warm up")], VisualInput(features.cpu(), "video"))
    for _ in model.stream(prepared, model.params(prepared, max_new_tokens=2)):
        pass
