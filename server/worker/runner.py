"""The GPU worker's job logic: extract a video's features, answer a question, emit events.

All model work goes through one single-thread executor, in small steps (one chunk of frames,
one decode step), and every running request submits its steps to it. The executor's FIFO order
interleaves them: a long extraction never blocks questions about cached videos for more than
one chunk, and concurrent answers advance token by token. Everything else (cache, registry,
events) is async on the event loop. The same class runs inside ``llamavid serve`` and inside
each ``llamavid worker``; only where jobs come from and events go differs.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import torch

from cache import FeatureStore, Manifest, sampling_id
from model.batching import BatchedDecoder
from model.conversation import Message, get_template
from model.detokenize import IncrementalDetokenizer
from model.generate import generate_tokens, with_budget
from model.llama_vid import LlamaVid, VisualInput
from model.pipeline import ImageDecodeError, decode_image, encode_image, plan_video
from model.video import FrameSampling, VideoDecodeError

from ..jobs import Event, MediaRef, QuestionJob, Sampling, VideoJob, error_event
from ..metrics import LlamaVidMetrics
from ..storage import MediaStore, VideoRegistry

log = logging.getLogger(__name__)

Emit = Callable[[Event], Awaitable[None]]
IMAGE_SAMPLING = {"image": True}


class JobError(Exception):
    """A failure to report to the client as a 4xx/5xx error event."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class ModelRunner:
    def __init__(
        self,
        model: LlamaVid,
        store: FeatureStore,
        media: MediaStore,
        registry: VideoRegistry,
        metrics: LlamaVidMetrics,
        *,
        max_running: int = 8,
        encode_batch: int = 32,
        stall_timeout: float = 60.0,
        template: str = "vicuna_v1",
        on_cache_access: Callable[[], None] | None = None,
        batch_capacity: int = 8192,
    ) -> None:
        self.model = model
        self.store = store
        self.media = media
        self.registry = registry
        self.metrics = metrics
        self.encode_batch = encode_batch
        self.stall_timeout = stall_timeout
        self.template = template
        self._on_cache_access = on_cache_access or (lambda: None)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="llamavid-model")
        self._running = asyncio.Semaphore(max_running)
        self.max_running = max_running
        self.batch_capacity = batch_capacity  # positions per slot of the shared decode cache; 0 disables batching
        self._batch: BatchedDecoder | None = None
        self._decode_task: asyncio.Task | None = None
        self._extracting: dict[tuple[str, str], asyncio.Task[tuple[torch.Tensor, Manifest]]] = {}

    async def compute(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one step of model work on the model thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- videos ----------------------------------------------------------------------------------
    async def extract(self, job: VideoJob) -> None:
        """A video job: make sure the features of this sampling of the video are cached."""
        try:
            await self._video_features(job.digest, job.sampling, job.video_id, emit=None)
            self.metrics.video_job_finished("done")
        except asyncio.CancelledError:
            self.metrics.video_job_finished("cancelled")
            raise
        except Exception:  # already recorded on the video's record by _extract_tracked
            self.metrics.video_job_finished("failed")

    async def _video_features(
        self, digest: str, sampling: dict, video_id: str | None, emit: Emit | None
    ) -> tuple[torch.Tensor | list[torch.Tensor], Manifest]:
        """Cached features, or wait for another extraction of the same video, or extract here."""
        sid = sampling_id(sampling)
        cached = await self._cached(digest, sid)
        if cached is not None:
            if video_id:
                record = await self.registry.get(video_id)
                if record and record.status != "ready":
                    await self._mark_ready(video_id, cached[1])
            return cached
        key = (digest, sid)
        if key not in self._extracting and video_id and not await self.registry.claim(video_id, self.stall_timeout):
            # Another worker (or request) is extracting this video: follow its progress instead.
            waited = await self._wait_for_other_worker(video_id, emit)
            if waited is not None:
                return waited
        task = self._extracting.get(key)  # looked up after the await: another request may have started it
        if task is None:
            task = asyncio.ensure_future(self._extract_tracked(digest, sampling, video_id))
            self._extracting[key] = task
            task.add_done_callback(lambda _: self._extracting.pop(key, None))
        relay = asyncio.ensure_future(self._relay_progress(video_id, emit)) if emit and video_id else None
        try:
            return await asyncio.shield(task)
        finally:
            if relay is not None:
                relay.cancel()

    async def _relay_progress(self, video_id: str, emit: Emit) -> None:
        async for record in self.registry.watch(video_id, timeout=float("inf")):
            await emit(_progress(record))

    async def _extract_tracked(self, digest: str, sampling: dict, video_id: str | None) -> tuple[torch.Tensor, Manifest]:
        """``_extract_now`` that leaves the video record failed, with the reason, if it fails."""
        try:
            return await self._extract_now(digest, sampling, video_id)
        except Exception as exc:
            if not isinstance(exc, JobError):
                log.exception("extracting video %s failed", video_id or digest)
                exc = JobError(500, "internal_error", f"internal error: {type(exc).__name__}: {exc}")
            if video_id:
                await self.registry.update(video_id, status="failed", error=exc.message, error_code=exc.code)
            raise exc

    async def _cached(self, digest: str, sid: str) -> tuple[torch.Tensor, Manifest] | None:
        features = None
        try:
            manifest = await self.store.get_manifest(self.model.encoder_fingerprint, digest, sid)
            if manifest is not None:
                # Per-frame references, stacked by the model one block at a time: no hour-long copy.
                frames = await self.store.get_frames(manifest.encoder_id, digest, manifest.frame_indices)
                features = None if any(f is None for f in frames) else frames
        finally:
            self._on_cache_access()
        return None if features is None else (features, manifest)

    async def _wait_for_other_worker(self, video_id: str, emit: Emit | None) -> tuple[torch.Tensor, Manifest] | None:
        """Follow another extraction of this video; None if it stalls (its worker died) or vanishes."""
        while True:
            record = None
            async for record in self.registry.watch(video_id, timeout=self.stall_timeout):
                if emit is not None:
                    await emit(_progress(record))
                if record.terminal:
                    break
            if record is None:
                return None
            if record.status == "ready":
                return await self._cached(record.digest, sampling_id(record.sampling))
            if record.status == "failed":
                raise JobError(400, record.error_code or "invalid_video", record.error or "the video failed to extract")
            if time.time() - record.updated_at > self.stall_timeout:
                return None  # no progress for a while: take the extraction over

    async def _extract_now(self, digest: str, sampling: dict, video_id: str | None) -> tuple[torch.Tensor, Manifest]:
        data = await self.media.get(digest)
        if data is None:
            raise JobError(410, "media_gone", "the video's bytes are no longer stored; upload it again")
        spec = Sampling.from_dict(sampling)
        frame_sampling = FrameSampling(spec.fps, spec.max_frames, spec.start, spec.end)
        try:
            video, indices = await self.compute(plan_video, data, frame_sampling)
        except VideoDecodeError as exc:
            raise JobError(400, "invalid_video", str(exc)) from exc
        info = video.info
        if video_id:
            await self.registry.update(
                video_id, status="extracting", frames_total=len(indices), frames_done=0, duration=info.duration,
                source_fps=info.avg_fps, fps=spec.fps, width=info.width, height=info.height,
            )
        chunks, done = [], 0
        frames_iter = video.iter_frames(indices, chunk=self.encode_batch)
        while True:
            try:
                with self.metrics.stage("decode"):
                    frames = await self.compute(next, frames_iter, None)
            except VideoDecodeError as exc:
                raise JobError(400, "invalid_video", str(exc)) from exc
            if frames is None:
                break
            with self.metrics.stage("encode"):
                feats = await self.compute(self._encode_chunk, frames)
            part = indices[done : done + len(frames)]
            await self.store.put_frames(self.model.encoder_fingerprint, digest, part, feats)
            chunks.append(feats)
            done += len(frames)
            self.metrics.frames_decoded.inc(len(frames))
            self.metrics.frames_encoded.inc(len(frames))
            if video_id:
                await self.registry.update(video_id, frames_done=done)
        features = torch.cat(chunks)
        manifest = Manifest(
            video_digest=digest, encoder_id=self.model.encoder_fingerprint, sampling=sampling,
            frame_indices=indices, timestamps=video.timestamps(indices), source_fps=info.avg_fps,
            num_source_frames=info.num_frames, duration=info.duration, feature_shape=list(features.shape[1:]),
            dtype="float16",
        )
        await self.store.put_manifest(manifest)
        if video_id:
            await self._mark_ready(video_id, manifest)
        return features, manifest

    def _encode_chunk(self, frames) -> torch.Tensor:
        # Stored and served as fp16, so the first answer sees exactly what later (cached) ones see.
        pixels = self.model.preprocess(frames)
        return self.model.encode_frames(pixels, batch_size=self.encode_batch).to("cpu", torch.float16)

    async def _mark_ready(self, video_id: str, manifest: Manifest) -> None:
        await self.registry.update(
            video_id, status="ready", frames_total=manifest.num_frames, frames_done=manifest.num_frames,
            duration=manifest.duration, source_fps=manifest.source_fps, error=None, error_code=None,
        )

    async def _image_features(self, digest: str) -> torch.Tensor:
        sid = sampling_id(IMAGE_SAMPLING)
        cached = await self._cached(digest, sid)
        if cached is not None:
            return cached[0]
        data = await self.media.get(digest)
        if data is None:
            raise JobError(410, "media_gone", "the image's bytes are no longer stored; send it again")
        try:
            image = await self.compute(decode_image, data)
        except ImageDecodeError as exc:
            raise JobError(400, "invalid_image", str(exc)) from exc
        with self.metrics.stage("encode"):
            feats = await self.compute(lambda: encode_image(self.model, image).to(torch.float16))
        self.metrics.frames_encoded.inc(1)
        await self.store.put_frames(self.model.encoder_fingerprint, digest, [0], feats)
        await self.store.put_manifest(Manifest(
            video_digest=digest, encoder_id=self.model.encoder_fingerprint, sampling=IMAGE_SAMPLING,
            frame_indices=[0], timestamps=[0.0], source_fps=1.0, num_source_frames=1, duration=0.0,
            feature_shape=list(feats.shape[1:]), dtype="float16",
        ))
        return feats

    # -- questions -------------------------------------------------------------------------------
    async def answer(self, job: QuestionJob, emit: Emit, cancelled: Callable[[], bool | Awaitable[bool]]) -> None:
        """Answer one question, emitting progress, relevance, deltas and a final done/error event."""
        tracker = self.metrics.track_request(job.arrival_time)
        try:
            with tracker:
                visual, timestamps = await self._visual(job, emit)
                async with self._running:
                    tracker.start()
                    reason = await self._generate(job, visual, timestamps, emit, cancelled, tracker)
                tracker.finish(reason)
        except JobError as exc:
            await emit(error_event(exc.status, exc.code, exc.message))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("request %s failed", job.request_id)
            await emit(error_event(500, "internal_error", f"internal error: {type(exc).__name__}: {exc}"))

    async def _visual(self, job: QuestionJob, emit: Emit) -> tuple[VisualInput | None, list[float]]:
        ref = job.media_ref
        if ref is None:
            return None, []
        if ref.kind == "image":
            return VisualInput(await self._image_features(ref.digest), "image"), [0.0]
        features, manifest = await self._video_features(ref.digest, ref.sampling or {}, ref.video_id, emit)
        return VisualInput(features, "video"), manifest.timestamps

    async def _generate(self, job, visual, timestamps, emit, cancelled, tracker) -> str:
        messages = [Message(m["role"], m["content"]) for m in job.messages]
        template = get_template(job.template or self.template)
        if job.system is not None:
            template = replace(template, system=job.system)
        try:
            with self.metrics.stage("tokens"):
                prepared = await self.compute(
                    lambda: self.model.prepare(messages, visual, template=template, with_relevance=job.relevance)
                )
            params = self.model.params(**job.params)  # request values over generation_config.json
            params = with_budget(params, prepared.num_prompt_tokens, self.model.context_length)
        except ValueError as exc:
            code = "context_length_exceeded" if "context" in str(exc) else "invalid_request"
            raise JobError(400, code, str(exc)) from exc
        tracker.prompt(prepared.num_prompt_tokens - prepared.num_visual_tokens, prepared.num_visual_tokens)
        if job.relevance and prepared.relevance is not None:
            await emit(Event("relevance", relevance_payload(prepared.relevance, timestamps)))
        batcher = await self._batcher()
        if batcher is not None and batcher.fits(prepared.num_prompt_tokens, params.max_new_tokens):
            tokens = _BatchedTokens(self, batcher, prepared.inputs_embeds, params)
        else:
            tokens = _SingleTokens(self, generate_tokens(self.model.llm, prepared.inputs_embeds, params,
                                                         eos_id=self.model.tokenizer.eos_id))
        detok = IncrementalDetokenizer(self.model.tokenizer, params.stop)
        eos = self.model.tokenizer.eos_id
        completion, reason = 0, "abort"
        try:
            while True:
                gone = await _is_set(cancelled)
                if gone or (job.deadline is not None and time.time() > job.deadline):
                    if not gone:
                        await emit(error_event(408, "timeout", "the request ran past its deadline"))
                    break
                with self.metrics.stage("prefill" if completion == 0 else "decode_step"):
                    token = await tokens.next()
                completion += 1
                tracker.token()
                if token == eos:
                    text, reason = detok.finish(), "stop"
                else:
                    text = detok.add(token)
                    if detok.stopped:
                        reason = "stop"
                    elif completion >= params.max_new_tokens:
                        text, reason = text + detok.finish(), "length"
                if text:  # the detokenizer holds back partial characters and stop-string prefixes
                    await emit(Event("delta", {"text": text}))
                if reason != "abort":
                    break
        finally:
            await tokens.close()
        if reason != "abort":
            await emit(Event("done", {
                "finish_reason": reason,
                "prompt_tokens": prepared.num_prompt_tokens,
                "visual_tokens": prepared.num_visual_tokens,
                "completion_tokens": completion,
            }))
        return reason

    async def _batcher(self) -> BatchedDecoder | None:
        if self._batch is None and self.batch_capacity > 0:
            capacity = min(2 * self.model.context_length, self.batch_capacity)
            self._batch = await self.compute(lambda: BatchedDecoder(self.model.llm, self.max_running, capacity))
        return self._batch

    def _ensure_decode_loop(self) -> None:
        if self._decode_task is None or self._decode_task.done():
            self._decode_task = asyncio.ensure_future(self._decode_loop())

    async def _decode_loop(self) -> None:
        """One batched decode step after another while any request holds a slot."""
        batch = self._batch
        while batch is not None and batch.active:
            for handle, token in await self.compute(batch.step):
                handle.put_nowait(token)


class _SingleTokens:
    """Tokens of one request decoded on its own (it does not fit the batch cache)."""

    def __init__(self, runner: ModelRunner, generator) -> None:
        self.runner, self.generator = runner, generator

    async def next(self) -> int:
        return await self.runner.compute(next, self.generator)

    async def close(self) -> None:
        await self.runner.compute(self.generator.close)


class _BatchedTokens:
    """Tokens of one request in the shared decode batch: prefilled alone, then stepped with the others."""

    def __init__(self, runner: ModelRunner, batch: BatchedDecoder, inputs_embeds, params) -> None:
        self.runner, self.batch, self.inputs_embeds, self.params = runner, batch, inputs_embeds, params
        self.queue: asyncio.Queue[int] = asyncio.Queue()
        self.added = False

    async def next(self) -> int:
        if not self.added:
            self.added = True
            token = await self.runner.compute(self.batch.add, self.queue, self.inputs_embeds, self.params)
            self.runner._ensure_decode_loop()
            return token
        return await self.queue.get()

    async def close(self) -> None:
        if self.added:
            await self.runner.compute(self.batch.remove, self.queue)


async def _is_set(flag: Callable[[], bool | Awaitable[bool]]) -> bool:
    """The cancel flag: a plain callable in-process, a Redis lookup in a split deployment."""
    value = flag()
    return bool(await value) if inspect.isawaitable(value) else bool(value)


def relevance_payload(scores: torch.Tensor, timestamps: list[float]) -> dict:
    """Per-frame relevance: the raw attention score and a softmax over frames (sums to 1)."""
    raw = scores.float()
    weights = torch.softmax(raw, dim=0)
    return {
        "frames": [
            {"index": i, "time": round(timestamps[i], 3) if i < len(timestamps) else None,
             "score": round(float(raw[i]), 5), "weight": round(float(weights[i]), 6)}
            for i in range(len(raw))
        ]
    }


def _progress(record) -> Event:
    return Event("progress", {
        "video_id": record.id, "status": record.status, "frames_done": record.frames_done,
        "frames_total": record.frames_total, "error": record.error,
    })
