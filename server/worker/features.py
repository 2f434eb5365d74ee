"""A question's visual features: from the cache, from another worker's extraction, or made here.

Extraction consumes ``model.pipeline.iter_video_features`` one chunk at a time on the model
thread (the same loop ``llamavid ask`` and the evaluation run) and adds what only the service
needs around it: cache writes per chunk, progress on the video's record, and one extraction
per video across requests and workers (a claim on the record; a stalled claim is taken over).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence

import torch

from cache import FeatureStore, Manifest, sampling_id
from model.image import ImageDecodeError, decode_image
from model.llama_vid import LlamaVid
from model.pipeline import FEATURE_DTYPE, FeatureChunk, encode_image, iter_video_features, plan_video
from model.video import FrameSampling, VideoDecodeError, VideoFile

from ..engine.events import AnyEvent, ErrorEvent, ProgressEvent
from ..engine.jobs import MediaRef, Sampling, VideoJob, VideoRecord
from ..engine.protocol import EngineUnavailable
from ..engine.storage import MediaStore, VideoRegistry
from ..metrics import LlamaVidMetrics
from .model_thread import ModelThread

log = logging.getLogger(__name__)

Emit = Callable[[AnyEvent], Awaitable[None]]
Frames = Sequence[torch.Tensor]  # per-frame [1+P, C] features, never stacked into one hour-long tensor
IMAGE_SAMPLING = {"image": True}


class JobError(Exception):
    """A failure to report to the client as an error event with an HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.event = ErrorEvent(status=status, code=code, message=message)


class FeatureSource:
    def __init__(self, model: LlamaVid, store: FeatureStore, media: MediaStore, registry: VideoRegistry,
                 metrics: LlamaVidMetrics, thread: ModelThread, *, encode_batch: int, stall_timeout: float,
                 on_cache_access: Callable[[], None]) -> None:
        self.model = model
        self.store = store
        self.media = media
        self.registry = registry
        self.metrics = metrics
        self.thread = thread
        self.encode_batch = encode_batch
        self.stall_timeout = stall_timeout
        self._on_cache_access = on_cache_access
        self._extracting: dict[tuple[str, str], asyncio.Task[tuple[Frames, Manifest]]] = {}

    async def extract(self, job: VideoJob) -> None:
        """A video job: make sure this sampling of the video is cached."""
        try:
            await self.video(MediaRef(kind="video", digest=job.digest, video_id=job.video_id,
                                      sampling=job.sampling), emit=None)
            self.metrics.video_job_finished("done")
        except (asyncio.CancelledError, EngineUnavailable):  # stopped, or a backend blip: left for a retry
            self.metrics.video_job_finished("cancelled")
            raise
        except Exception:  # already recorded on the video's record by _extract_tracked
            self.metrics.video_job_finished("failed")

    async def video(self, ref: MediaRef, emit: Emit | None) -> tuple[Frames, Manifest]:
        """Cached features, or wait for another extraction of the same video, or extract here."""
        sampling = ref.sampling or Sampling()
        sid = sampling_id(sampling.model_dump())
        cached = await self._cached(ref.digest, sid)
        if cached is not None:
            if ref.video_id:
                record = await self.registry.get(ref.video_id)
                if record and record.status != "ready":
                    await self._mark_ready(ref.video_id, cached[1], planned=record.frames_total)
            return cached
        key = (ref.digest, sid)
        if key not in self._extracting and ref.video_id and \
                not await self.registry.claim(ref.video_id, self.stall_timeout):
            # Another worker (or request) is extracting this video: follow its progress instead.
            waited = await self._wait_for_other_worker(ref.video_id, emit)
            if waited is not None:
                return waited
        task = self._extracting.get(key)  # looked up after the await: another request may have started it
        if task is None:
            task = asyncio.ensure_future(self._extract_tracked(ref.digest, sampling, ref.video_id))
            self._extracting[key] = task
            task.add_done_callback(lambda _: self._extracting.pop(key, None))
        relay = (asyncio.ensure_future(self._relay_progress(ref.video_id, emit)) if emit and ref.video_id
                 else None)
        try:
            return await asyncio.shield(task)
        finally:
            if relay is not None:
                relay.cancel()

    async def image(self, digest: str) -> Frames:
        sid = sampling_id(IMAGE_SAMPLING)
        cached = await self._cached(digest, sid)
        if cached is not None:
            return cached[0]
        data = await self.media.get(digest)
        if data is None:
            raise JobError(410, "media_gone", "the image's bytes are no longer stored; send it again")
        try:
            image = await self.thread(decode_image, data)
        except ImageDecodeError as exc:
            raise JobError(400, "invalid_image", str(exc)) from exc
        with self.metrics.stage("encode"):
            feats = await self.thread(encode_image, self.model, image)
        self.metrics.frames_encoded.inc(1)
        await self.store.put_frames(self.model.encoder_fingerprint, digest, [0], feats)
        await self.store.put_manifest(Manifest(
            video_digest=digest, encoder_id=self.model.encoder_fingerprint, sampling=IMAGE_SAMPLING,
            frame_indices=[0], timestamps=[0.0], source_fps=1.0, num_source_frames=1, duration=0.0,
            feature_shape=list(feats.shape[1:]), dtype=_dtype_name(),
        ))
        return feats

    async def _relay_progress(self, video_id: str, emit: Emit) -> None:
        async for record in self.registry.watch(video_id, timeout=float("inf")):
            await emit(progress_event(record))

    async def _extract_tracked(self, digest: str, sampling: Sampling,
                               video_id: str | None) -> tuple[Frames, Manifest]:
        """``_extract_now`` that leaves the video record failed, with the reason, if it fails."""
        try:
            return await self._extract_now(digest, sampling, video_id)
        except EngineUnavailable:
            raise  # not the video's fault: it is not marked failed, and the job is retried
        except Exception as exc:
            if not isinstance(exc, JobError):
                log.exception("extracting video %s failed", video_id or digest)
                exc = JobError(500, "internal_error", f"internal error: {type(exc).__name__}: {exc}")
            if video_id:
                await self.registry.update(video_id, status="failed", error=exc.event.message,
                                           error_code=exc.event.code)
            raise exc

    async def _cached(self, digest: str, sid: str) -> tuple[Frames, Manifest] | None:
        try:
            manifest = await self.store.get_manifest(self.model.encoder_fingerprint, digest, sid)
            if manifest is None:
                return None
            frames = await self.store.get_frames(manifest.encoder_id, digest, manifest.frame_indices)
            return None if any(f is None for f in frames) else (frames, manifest)
        finally:
            self._on_cache_access()

    async def _wait_for_other_worker(self, video_id: str,
                                     emit: Emit | None) -> tuple[Frames, Manifest] | None:
        """Follow another extraction of this video; None if it stalls (its worker died) or vanishes."""
        while True:
            record = None
            async for record in self.registry.watch(video_id, timeout=self.stall_timeout):
                if emit is not None:
                    await emit(progress_event(record))
                if record.terminal:
                    break
            if record is None:
                return None
            if record.status == "ready":
                return await self._cached(record.digest, sampling_id(record.sampling.model_dump()))
            if record.status == "failed":
                raise JobError(400, record.error_code or "invalid_video",
                               record.error or "the video failed to extract")
            if time.time() - record.updated_at > self.stall_timeout:
                return None  # no progress for a while: take the extraction over

    async def _extract_now(self, digest: str, sampling: Sampling,
                           video_id: str | None) -> tuple[Frames, Manifest]:
        data = await self.media.get(digest)
        if data is None:
            raise JobError(410, "media_gone", "the video's bytes are no longer stored; upload it again")
        plan = FrameSampling(sampling.fps, sampling.max_frames, sampling.start, sampling.end)
        try:
            video, indices = await self.thread(plan_video, data, plan)
        except VideoDecodeError as exc:
            raise JobError(415 if exc.code == "audio_only" else 400, exc.code, str(exc)) from exc
        try:
            return await self._encode(video, indices, digest, sampling, video_id)
        finally:
            await self.thread(video.close)  # the spooled copy and the decoders' file handles

    async def _encode(self, video: VideoFile, indices: list[int], digest: str, sampling: Sampling,
                      video_id: str | None) -> tuple[Frames, Manifest]:
        info = video.info
        if video_id:
            await self.registry.update(
                video_id, status="extracting", frames_total=len(indices), frames_done=0,
                duration=info.duration, source_fps=info.avg_fps, fps=sampling.fps, width=info.width,
                height=info.height,
            )
        # Frames a previous, interrupted extraction already cached are read, not encoded again.
        cached = await self.store.get_frames(self.model.encoder_fingerprint, digest, indices)
        frames: dict[int, torch.Tensor] = {i: f for i, f in zip(indices, cached) if f is not None}
        missing = [i for i in indices if i not in frames]
        if frames:
            log.info("video %s: %d of %d frames already cached; encoding the rest", video_id or digest,
                     len(frames), len(indices))
        # Frames that do not decode (a corrupt stretch) are left out and counted; with other frames
        # cached by an earlier attempt, a chunk of nothing decodable is not yet a failed video.
        chunks = iter_video_features(self.model, video, missing, chunk=self.encode_batch,
                                     require_frames=not frames)
        skipped: list[int] = []
        try:
            await self._consume(chunks, frames, skipped, digest, video_id)
        finally:
            await self.thread(chunks.close)  # stops the read-ahead threads of an abandoned extraction
        if skipped:
            log.warning("video %s: %d of %d sampled frames could not be decoded and were left out",
                        video_id or digest, len(skipped), len(indices))
        kept = [i for i in indices if i in frames]
        ordered = [frames[i] for i in kept]
        manifest = Manifest(
            video_digest=digest, encoder_id=self.model.encoder_fingerprint, sampling=sampling.model_dump(),
            frame_indices=kept, timestamps=video.timestamps(kept), source_fps=info.avg_fps,
            num_source_frames=info.num_frames, duration=info.duration, feature_shape=list(ordered[0].shape),
            dtype=_dtype_name(),
        )
        await self.store.put_manifest(manifest)
        if video_id:
            await self._mark_ready(video_id, manifest, planned=len(indices))
        return ordered, manifest

    async def _consume(self, chunks: Iterator[FeatureChunk], frames: dict[int, torch.Tensor], skipped: list[int],
                       digest: str, video_id: str | None) -> None:
        """Encoded chunks into the cache (and ``frames``), progress onto the record, as they come."""
        while True:
            if video_id:
                await self.registry.update(video_id, frames_done=len(frames) + len(skipped),
                                           frames_skipped=len(skipped))
            try:
                chunk = await self.thread(next, chunks, None)
            except VideoDecodeError as exc:
                raise JobError(400, exc.code, str(exc)) from exc
            if chunk is None:
                break
            skipped += chunk.skipped
            self.metrics.observe_stage("decode", chunk.decode_seconds)
            self.metrics.observe_stage("encode", chunk.encode_seconds)
            if not chunk.indices:
                continue
            await self.store.put_frames(self.model.encoder_fingerprint, digest, chunk.indices, chunk.features)
            frames.update(zip(chunk.indices, chunk.features.unbind(0)))  # views: no second copy of the video
            self.metrics.frames_decoded.inc(len(chunk.indices))
            self.metrics.frames_encoded.inc(len(chunk.indices))

    async def _mark_ready(self, video_id: str, manifest: Manifest, *, planned: int) -> None:
        """The record shows the frames the questions see: those that decoded, at their times."""
        await self.registry.update(
            video_id, status="ready", frames_total=manifest.num_frames, frames_done=manifest.num_frames,
            frames_skipped=max(0, planned - manifest.num_frames), timestamps=[round(t, 3) for t in manifest.timestamps],
            duration=manifest.duration, source_fps=manifest.source_fps, error=None, error_code=None,
        )


def progress_event(record: VideoRecord) -> ProgressEvent:
    return ProgressEvent(video_id=record.id, status=record.status, frames_done=record.frames_done,
                         frames_total=record.frames_total, error=record.error)


def _dtype_name() -> str:
    return str(FEATURE_DTYPE).removeprefix("torch.")
