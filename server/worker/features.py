"""A question's visual features: from the cache, from another worker's extraction, or made here.

Extraction consumes ``model.pipeline.iter_video_features`` one chunk at a time on the model
thread (the same loop ``llamavid ask`` and the evaluation run) and adds what only the service
needs around it: cache writes per chunk, progress on the video's record, and one extraction
per video across requests and workers (a claim on the record; a stalled claim is taken over).

A long video is cut into ranges of sampled frames on a ``RangeBoard``. The extraction's owner asks
idle workers for help (helper jobs, split deployment only) and every participant, the owner too,
takes ranges until none is left; each holds its range under a lease it renews on its own
schedule, so a slow worker keeps its range and a dead one's range is taken over within
``RANGE_LEASE_SECONDS`` and resumed from its last cached chunk. The owner writes the manifest once
every range is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import torch

from cache import FeatureStore, Manifest, MemoryFeatureStore, TieredFeatureStore, sampling_id
from model.image import ImageDecodeError, decode_image
from model.llama_vid import LlamaVid
from model.pipeline import FEATURE_DTYPE, FeatureChunk, encode_image, iter_video_features, plan_video
from model.video import FrameSampling, VideoDecodeError, VideoFile

from ..engine.events import AnyEvent, ErrorEvent, ProgressEvent
from ..engine.jobs import MediaRef, Sampling, VideoJob, VideoRecord
from ..engine.protocol import EngineUnavailable
from ..engine.storage import BoardState, MediaStore, RangeBoard, RangeClaim, VideoRegistry
from ..metrics import LlamaVidMetrics
from .model_thread import ModelThread

log = logging.getLogger(__name__)

Emit = Callable[[AnyEvent], Awaitable[None]]
Frames = Sequence[torch.Tensor]  # per-frame [1+P, C] features, never stacked into one hour-long tensor
AskHelp = Callable[[VideoJob, int], Awaitable[None]]  # queue up to n helper jobs for an extraction
IMAGE_SAMPLING = {"image": True}
RANGE_LEASE_SECONDS = 5.0  # a range whose holder has not renewed it for this long is taken over
RANGE_RENEW_SECONDS = 1.0
RANGE_POLL_SECONDS = 0.25  # how often a board is looked at while waiting for others (cheap: one HGETALL)


class JobError(Exception):
    """A failure to report to the client as an error event with an HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.event = ErrorEvent(status=status, code=code, message=message)


@contextlib.asynccontextmanager
async def stored_video(media: MediaStore, digest: str) -> AsyncIterator[Path]:
    """The stored video as a local file, which decoders read (copied a few parts at a time, never
    whole in memory: an hour of 1080p is gigabytes), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="llamavid-video-") as folder:
        path = Path(folder) / digest
        if not await media.copy_to(digest, path):
            raise JobError(410, "media_gone", "the video's bytes are no longer stored; upload it again")
        yield path


class FeatureSource:
    def __init__(self, model: LlamaVid, store: FeatureStore, media: MediaStore, registry: VideoRegistry,
                 metrics: LlamaVidMetrics, thread: ModelThread, *, boards: RangeBoard, encode_batch: int,
                 range_frames: int, stall_timeout: float, on_cache_access: Callable[[], None],
                 ask_help: AskHelp | None = None) -> None:
        self.model = model
        self.store = store
        self.media = media
        self.registry = registry
        self.metrics = metrics
        self.thread = thread
        self.boards = boards
        self.encode_batch = encode_batch
        self.range_frames = range_frames
        self.stall_timeout = stall_timeout
        self.ask_help = ask_help
        self.holder = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"  # on range boards
        self._on_cache_access = on_cache_access
        self._extracting: dict[tuple[str, str], asyncio.Task[tuple[Frames | None, Manifest]]] = {}

    async def extract(self, job: VideoJob) -> None:
        """A video job: make sure this sampling of the video is cached (or, for a helper job, take
        ranges of an extraction another worker owns)."""
        if job.helper:
            await self._help(job)
            return
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
        """Cached features, or wait for another extraction of the same video, or extract here.
        ``emit`` None: a video job, which wants the features cached, not back (it gets no frames,
        and its extraction keeps none in memory)."""
        sampling = ref.sampling or Sampling()
        sid = sampling_id(sampling.model_dump())
        question = emit is not None
        cached = await self._cached(ref.digest, sid, question=question, read=question)
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
            task = asyncio.ensure_future(self._extract_tracked(ref.digest, sampling, ref.video_id,
                                                               keep=emit is not None))
            self._extracting[key] = task
            task.add_done_callback(lambda _: self._extracting.pop(key, None))
        relay = (asyncio.ensure_future(self._relay_progress(ref.video_id, emit)) if emit and ref.video_id
                 else None)
        try:
            frames, manifest = await asyncio.shield(task)
        finally:
            if relay is not None:
                relay.cancel()
        if not question:
            return (), manifest
        self.metrics.question_features("extracted")
        if frames is None:  # a video job's extraction, which kept nothing in memory: read the cache
            frames = await self._gather(ref.digest, manifest.frame_indices, {})
        return frames, manifest

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

    async def _extract_tracked(self, digest: str, sampling: Sampling, video_id: str | None, *,
                               keep: bool) -> tuple[Frames | None, Manifest]:
        """``_extract_now`` that leaves the video record failed, with the reason, if it fails."""
        try:
            return await self._extract_now(digest, sampling, video_id, keep=keep)
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

    async def _cached(self, digest: str, sid: str, *, question: bool = False,
                      read: bool = True) -> tuple[Frames, Manifest] | None:
        """The cached features of this sampling, if every frame is there (not ``read``: if its
        manifest is); for a question, counted by the tier that held them
        (``llamavid_question_features_total``)."""
        try:
            manifest = await self.store.get_manifest(self.model.encoder_fingerprint, digest, sid)
            if manifest is None or not read:
                return None if manifest is None else ((), manifest)
            hot = held_hot(self.store, manifest)
            frames = await self.store.get_frames(manifest.encoder_id, digest, manifest.frame_indices)
            if any(f is None for f in frames):
                return None
            if question:
                self.metrics.question_features("hot" if hot else "cold")
            return frames, manifest
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
                return await self._cached(record.digest, sampling_id(record.sampling.model_dump()),
                                          read=emit is not None)
            if record.status == "failed":
                raise JobError(400, record.error_code or "invalid_video",
                               record.error or "the video failed to extract")
            if time.time() - record.updated_at > self.stall_timeout:
                return None  # no progress for a while: take the extraction over

    async def _extract_now(self, digest: str, sampling: Sampling, video_id: str | None, *,
                           keep: bool) -> tuple[Frames | None, Manifest]:
        # Helpers are asked before this worker fetches and plans the video, which they do too: all
        # are ready to take ranges at about the same time. The upload's probe says how many frames.
        record = await self.registry.get(video_id) if video_id and self.ask_help is not None else None
        planned = (record.frames_total or 0) if record else 0
        asked = await self._ask_for_helpers(digest, sampling, video_id, -(-planned // self.range_frames))
        async with self._opened(digest, sampling) as (video, indices):
            return await self._extract_ranges(video, indices, digest, sampling, video_id, keep=keep,
                                              helpers_asked=asked)

    async def _ask_for_helpers(self, digest: str, sampling: Sampling, video_id: str | None, ranges: int) -> bool:
        """Queue a helper job per range beyond this worker's first (split deployment only); whether any."""
        if self.ask_help is None or ranges <= 1:
            return False
        await self.ask_help(VideoJob(video_id=video_id or "", digest=digest, sampling=sampling, helper=True),
                            ranges - 1)
        return True

    @contextlib.asynccontextmanager
    async def _opened(self, digest: str, sampling: Sampling) -> AsyncIterator[tuple[VideoFile, list[int]]]:
        """The stored video and its sampled frames: every participant plans the same frames."""
        async with stored_video(self.media, digest) as path:
            plan = FrameSampling(sampling.fps, sampling.max_frames, sampling.start, sampling.end)
            try:
                video, indices = await self.thread(plan_video, path, plan)
            except VideoDecodeError as exc:
                raise JobError(415 if exc.code == "audio_only" else 400, exc.code, str(exc)) from exc
            try:
                yield video, indices
            finally:
                await self.thread(video.close)  # the decoders' file handles, before the file goes

    def _board(self, digest: str, sampling: Sampling) -> str:
        return f"{self.model.encoder_fingerprint}:{digest}:{sampling_id(sampling.model_dump())}"

    async def _extract_ranges(self, video: VideoFile, indices: list[int], digest: str, sampling: Sampling,
                              video_id: str | None, *, keep: bool,
                              helpers_asked: bool) -> tuple[Frames | None, Manifest]:
        """Own the extraction: set up the board (or find the one a dead owner left), ask for help,
        take ranges until every range is done, then write the manifest.

        With ``keep``, the frames this worker encodes stay in memory and the others' are read back
        from the cache (a question waits for them); without, nothing is held (a video job).
        """
        info = video.info
        board = self._board(digest, sampling)
        # Ranges only pay off where others can help: alone, one range keeps the pipeline full.
        # Ranges of equal length (the last one short would leave its worker idle at the end).
        count = max(1, -(-len(indices) // self.range_frames)) if self.ask_help is not None else 1
        await self.boards.create(board, count, -(-len(indices) // count))
        state = await self.boards.state(board)
        if video_id:
            await self.registry.update(
                video_id, status="extracting", frames_total=len(indices), frames_done=state.frames,
                duration=info.duration, source_fps=info.avg_fps, fps=sampling.fps, width=info.width,
                height=info.height,
            )
        if not helpers_asked:  # the upload said nothing of the frames: ask now, knowing them
            await self._ask_for_helpers(digest, sampling, video_id, state.count - state.done)
        frames: dict[int, torch.Tensor] | None = {} if keep else None
        state = await self._take_ranges(board, video, indices, digest, video_id, frames, wait=True)
        if not state.complete:  # the board is gone: another owner (a takeover) finished, or Redis lost it
            cached = await self._cached(digest, sampling_id(sampling.model_dump()), read=keep)
            if cached is None:
                raise EngineUnavailable("the extraction's range board vanished with the queue backend (Redis); "
                                        "the job is retried", code="backend_restarted")
            return (cached[0] if keep else None), cached[1]
        skipped = set(state.skipped)
        kept = [i for i in indices if i not in skipped]
        if not kept:
            raise JobError(400, "invalid_video", f"none of the {len(indices)} sampled frames could be decoded")
        if skipped:
            log.warning("video %s: %d of %d sampled frames could not be decoded and were left out",
                        video_id or digest, len(skipped), len(indices))
        ordered = await self._gather(digest, kept, frames)
        manifest = Manifest(
            video_digest=digest, encoder_id=self.model.encoder_fingerprint, sampling=sampling.model_dump(),
            frame_indices=kept, timestamps=video.timestamps(kept), source_fps=info.avg_fps,
            num_source_frames=info.num_frames, duration=info.duration,
            feature_shape=list(self.model.frame_feature_shape), dtype=_dtype_name(),
        )
        await self.store.put_manifest(manifest)
        await self.boards.delete(board)
        if video_id:
            await self._mark_ready(video_id, manifest, planned=len(indices))
        return ordered, manifest

    async def _gather(self, digest: str, kept: list[int], frames: dict[int, torch.Tensor] | None) -> Frames | None:
        """``kept``'s features: those in ``frames``, the rest read from the cache (None: keep nothing)."""
        if frames is None:
            return None
        absent = [i for i in kept if i not in frames]
        if absent:
            read = await self.store.get_frames(self.model.encoder_fingerprint, digest, absent)
            if any(f is None for f in read):
                raise JobError(503, "features_evicted", "part of the video's features were evicted from the "
                               "cache as soon as they were made; the cache is too small for it")
            frames.update(zip(absent, read))
        return [frames[i] for i in kept]

    async def _help(self, job: VideoJob) -> None:
        """A helper job: take ranges of an extraction another worker owns, until none is left. The
        owner may still be planning the video (it asked first): its board is waited for."""
        sid = sampling_id(job.sampling.model_dump())
        if (job.digest, sid) in self._extracting:
            return  # this process owns it
        board = self._board(job.digest, job.sampling)
        try:
            async with self._opened(job.digest, job.sampling) as (video, indices):
                deadline = time.monotonic() + self.stall_timeout
                while (await self.boards.state(board)).count == 0:
                    if time.monotonic() > deadline or await self.store.get_manifest(
                            self.model.encoder_fingerprint, job.digest, sid) is not None:
                        return  # over already, or its owner died before setting up (its job is reclaimed)
                    await asyncio.sleep(RANGE_POLL_SECONDS)
                await self._take_ranges(board, video, indices, job.digest, job.video_id or None, None, wait=False)
        except JobError as exc:  # left to the owner, who resumes the range (and reports the error)
            log.warning("helping extract %s failed: %s", job.video_id or job.digest, exc)

    async def _take_ranges(self, board: str, video: VideoFile, indices: list[int], digest: str,
                           video_id: str | None, frames: dict[int, torch.Tensor] | None, *,
                           wait: bool) -> BoardState:
        """Claim and extract ranges until none is left to take; with ``wait`` (the owner), until
        every range is done, taking over the ranges of holders that die meanwhile."""
        last: int | None = None
        while True:
            claim = await self.boards.claim(board, self.holder, RANGE_LEASE_SECONDS, after=last)
            if claim is None:
                state = await self.boards.state(board)
                if not wait or state.complete or state.count == 0:
                    return state
                await asyncio.sleep(RANGE_POLL_SECONDS)
                continue
            self.metrics.extraction_range("resumed" if claim.resumed else "fresh")
            part = indices[claim.index * claim.size : (claim.index + 1) * claim.size]
            if claim.resumed:
                log.warning("video %s: resuming range %d, whose worker stopped", video_id or digest, claim.index)
            else:
                log.info("video %s: range %d (%d frames)", video_id or digest, claim.index, len(part))
            skipped = await self._extract_range(board, claim, part, video, digest, video_id, frames)
            if skipped is not None:
                await self.boards.finish(board, claim.index, skipped)
            last = claim.index

    async def _extract_range(self, board: str, claim: RangeClaim, part: list[int], video: VideoFile, digest: str,
                             video_id: str | None, frames: dict[int, torch.Tensor] | None) -> list[int] | None:
        """Encode the frames of one range that are not cached yet; its skipped frames, or None if
        the range was taken over meanwhile (this worker stalled past its lease)."""
        cached = await self.store.get_frames(self.model.encoder_fingerprint, digest, part)
        have = {i: f for i, f in zip(part, cached) if f is not None}
        if frames is not None:
            frames.update(have)
        if have and not claim.resumed:  # cached by an extraction before this board: not counted yet
            await self._progress(board, video_id, len(have))
        missing = [i for i in part if i not in have]
        lost = asyncio.Event()
        renewing = asyncio.ensure_future(self._renew(board, claim.index, lost))
        chunks = iter_video_features(self.model, video, missing, chunk=self.encode_batch, require_frames=False)
        skipped: list[int] = []
        try:
            await self._consume(chunks, frames, skipped, digest, board, video_id, lost)
        finally:
            renewing.cancel()
            await self.thread(chunks.close)  # stops the read-ahead threads of an abandoned extraction
        return None if lost.is_set() else skipped

    async def _renew(self, board: str, index: int, lost: asyncio.Event) -> None:
        """Keep the range's lease while its frames are encoded, however slowly."""
        while True:
            await asyncio.sleep(RANGE_RENEW_SECONDS)
            try:
                if not await self.boards.renew(board, self.holder, index, RANGE_LEASE_SECONDS):
                    log.warning("range %d of %s was taken over by another worker; leaving it", index, board)
                    lost.set()
                    return
            except Exception as exc:  # a backend blip: try again; the lease outlives a few misses
                log.warning("renewing range %d of %s failed: %s", index, board, exc)

    async def _progress(self, board: str, video_id: str | None, frames: int) -> None:
        total = await self.boards.add_frames(board, frames)
        if video_id:
            await self.registry.advance(video_id, total)

    async def _consume(self, chunks: Iterator[FeatureChunk], frames: dict[int, torch.Tensor] | None,
                       skipped: list[int], digest: str, board: str, video_id: str | None,
                       lost: asyncio.Event) -> None:
        """Encoded chunks into the cache (and ``frames``), progress onto the board, as they come."""
        while not lost.is_set():
            try:
                chunk = await self.thread(next, chunks, None)
            except VideoDecodeError as exc:
                raise JobError(400, exc.code, str(exc)) from exc
            if chunk is None:
                break
            skipped += chunk.skipped
            self.metrics.observe_stage("decode", chunk.decode_seconds)
            self.metrics.observe_stage("encode", chunk.encode_seconds)
            if chunk.indices:
                stored = await self.store.put_frames(self.model.encoder_fingerprint, digest, chunk.indices,
                                                     chunk.features)
                self.metrics.frames_recomputed.inc(stored)  # another worker had cached them already
                if frames is not None:  # views: no second copy of the video
                    frames.update(zip(chunk.indices, chunk.features.unbind(0)))
                self.metrics.frames_decoded.inc(len(chunk.indices))
                self.metrics.frames_encoded.inc(len(chunk.indices))
            await self._progress(board, video_id, len(chunk.indices) + len(chunk.skipped))

    async def _mark_ready(self, video_id: str, manifest: Manifest, *, planned: int) -> None:
        """The record shows the frames the questions see: those that decoded, at their times."""
        await self.registry.update(
            video_id, status="ready", frames_total=manifest.num_frames, frames_done=manifest.num_frames,
            frames_skipped=max(0, planned - manifest.num_frames), timestamps=[round(t, 3) for t in manifest.timestamps],
            duration=manifest.duration, source_fps=manifest.source_fps, error=None, error_code=None,
        )


def held_hot(store: FeatureStore, manifest: Manifest) -> bool:
    """Whether the worker's memory holds every frame of the manifest (asked before reading, since a
    tiered read promotes what it fetches): the hot tier of a tiered store, or a memory store."""
    if isinstance(store, TieredFeatureStore):
        store = store.hot
    return isinstance(store, MemoryFeatureStore) and store.holds(manifest.encoder_id, manifest.video_digest,
                                                                  manifest.frame_indices)


def progress_event(record: VideoRecord) -> ProgressEvent:
    return ProgressEvent(video_id=record.id, status=record.status, frames_done=record.frames_done,
                         frames_total=record.frames_total, error=record.error)


def _dtype_name() -> str:
    return str(FEATURE_DTYPE).removeprefix("torch.")
