"""API-side handling of media: fetch or receive bytes, check them, register, queue extraction.

Everything that can be judged without the model is judged here, before a request is queued or a
stream is opened, so bad input gets a 4xx JSON error rather than an error event: the URL
(address guard, size cap, content sniffing), the container (decord opens it and reads its
index), the duration and the frame range.
"""

from __future__ import annotations

import asyncio
import re

from cache.keys import digest_bytes
from model.image import ImageDecodeError, decode_image
from model.video import FrameSampling, VideoDecodeError, VideoFile, sample_indices

from ..engine.jobs import MediaRef, Sampling, VideoJob, VideoRecord, new_id
from ..engine.protocol import EngineClient, QueueFull
from ..fetch import FetchedMedia, MediaPolicy, decode_data_url, fetch_url, read_upload
from ..metrics import LlamaVidMetrics
from ..settings import Settings
from .errors import APIError
from .protocol import FrameOptions

VIDEO_ID = re.compile(r"^vid-[0-9a-f]{24}$")


class MediaIngest:
    def __init__(self, settings: Settings, engine: EngineClient, metrics: LlamaVidMetrics) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        common = dict(
            connect_timeout=settings.fetch_connect_timeout, read_timeout=settings.fetch_read_timeout,
            total_timeout=settings.fetch_total_timeout, allowed_networks=tuple(settings.allowed_media_hosts),
            allow_private=settings.allow_private_media,
        )
        self.video_policy = MediaPolicy(max_bytes=settings.max_video_bytes, **common)
        self.image_policy = MediaPolicy(max_bytes=settings.max_image_bytes, **common)

    # -- sampling ----------------------------------------------------------------------------------
    def sampling(self, options: FrameOptions | None, base: Sampling | None = None) -> Sampling:
        """Request fields over ``base`` (a video's own sampling) over the server defaults, validated."""
        s = self.settings
        current = base.model_copy() if base else Sampling(fps=s.fps, max_frames=s.max_frames)
        if options is not None:
            if options.fps is not None:
                current.fps = options.fps
            if options.max_frames is not None:
                current.max_frames = options.max_frames
            if options.start_time is not None:
                current.start = options.start_time
            if options.end_time is not None:
                current.end = options.end_time
        for name, value in (("start_time", current.start), ("end_time", current.end)):
            if value is not None and value > s.max_video_seconds:  # also keeps frame arithmetic finite
                raise APIError(400, f"{name} {value:g}s is past this server's longest video "
                                    f"({s.max_video_seconds:g}s)", code="invalid_time_range", param=name)
        if current.fps > s.max_fps:
            raise APIError(400, f"fps {current.fps} is above this server's limit of {s.max_fps}", code="invalid_fps", param="fps")
        if current.max_frames is None or current.max_frames > s.max_frames:
            if options is not None and options.max_frames is not None:
                raise APIError(400, f"max_frames {options.max_frames} is above this server's limit of {s.max_frames}",
                               code="invalid_max_frames", param="max_frames")
            current.max_frames = s.max_frames
        return current

    # -- bytes -------------------------------------------------------------------------------------
    async def fetch(self, url: str, kind: str, field: str) -> FetchedMedia:
        policy = self.video_policy if kind == "video" else self.image_policy
        with self.metrics.stage("fetch"):
            if url.startswith("data:"):
                return decode_data_url(url, policy.max_bytes, kind=kind, field=field)
            return await fetch_url(url, policy, kind=kind, field=field)

    async def upload(self, file, kind: str = "video") -> FetchedMedia:
        limit = self.settings.max_video_bytes if kind == "video" else self.settings.max_image_bytes
        with self.metrics.stage("fetch"):
            return await read_upload(file, limit, kind, field="file")

    # -- videos ------------------------------------------------------------------------------------
    async def video(self, data: bytes, sampling: Sampling, filename: str | None = None) -> VideoRecord:
        """Register a video (or find the same bytes + sampling already registered) and queue extraction."""
        digest, info = await asyncio.to_thread(self._probe, data)
        return await self._register(digest, info, len(data), sampling, filename, data, video_mime(data))

    def _probe(self, data: bytes):
        try:
            info = VideoFile(data).info
        except VideoDecodeError as exc:
            raise APIError(400, str(exc), code="invalid_video") from exc
        if info.duration > self.settings.max_video_seconds:
            raise APIError(413, f"the video is {info.duration:.0f}s long; this server accepts up to "
                                f"{self.settings.max_video_seconds:.0f}s", code="video_too_long")
        return digest_bytes(data), info

    async def _register(self, digest, info, size, sampling: Sampling, filename, data: bytes | None,
                        content_type: str | None = None) -> VideoRecord:
        planned = sample_indices(info, FrameSampling(sampling.fps, sampling.max_frames, sampling.start, sampling.end))
        if not planned:
            raise APIError(400, f"no frames to sample: the video is {info.duration:.1f}s long and the range starts at "
                                f"{sampling.start}s", code="empty_frame_range", param="start_time")
        existing = await self.engine.registry.find(digest, sampling)
        if existing is not None:
            return existing
        if data is not None:
            await self.engine.media.put(digest, data)
        record = VideoRecord(
            id=new_id("vid"), digest=digest, sampling=sampling, frames_total=len(planned),
            timestamps=[round(i / info.avg_fps, 3) for i in planned], content_type=content_type,
            duration=info.duration, source_fps=info.avg_fps, fps=sampling.fps, width=info.width,
            height=info.height, bytes=size, filename=filename,
        )
        await self.engine.registry.put(record)
        try:
            await self.engine.extract(VideoJob(video_id=record.id, digest=digest, sampling=record.sampling))
        except QueueFull:
            await self.engine.registry.delete(record.id)
            raise
        return record

    async def video_by_id(self, video_id: str, options: FrameOptions | None) -> VideoRecord:
        """An uploaded video; other sampling options make (or reuse) a sibling record of the same bytes."""
        record = await self.engine.registry.get(video_id) if VIDEO_ID.match(video_id) else None
        if record is None:
            raise APIError(404, f"no video with id {video_id!r}", code="video_not_found", param="video_id")
        sampling = self.sampling(options, base=record.sampling)
        if sampling == record.sampling:
            if record.status == "failed":
                raise APIError(400, f"video {video_id} failed to extract: {record.error}", code=record.error_code)
            return record
        data = await self.engine.media.get(record.digest)
        if data is None:
            raise APIError(410, "the video's bytes are no longer stored; upload it again", code="media_gone")
        return await self.video(data, sampling, record.filename)

    async def video_from_url(self, url: str, options: FrameOptions | None, field: str) -> VideoRecord:
        if VIDEO_ID.match(url):
            return await self.video_by_id(url, options)
        sampling = self.sampling(options)
        fetched = await self.fetch(url, "video", field)
        return await self.video(fetched.data, sampling, url.rsplit("/", 1)[-1][:200] if "://" in url else None)

    # -- images ------------------------------------------------------------------------------------
    async def image(self, data: bytes) -> MediaRef:
        try:
            await asyncio.to_thread(decode_image, data)
        except ImageDecodeError as exc:
            raise APIError(400, str(exc), code="invalid_image") from exc
        digest = digest_bytes(data)
        await self.engine.media.put(digest, data)
        return MediaRef(kind="image", digest=digest)

    async def image_from_url(self, url: str, field: str) -> MediaRef:
        return await self.image((await self.fetch(url, "image", field)).data)


def video_mime(data: bytes) -> str:
    """A Content-Type for serving the bytes back to a browser's <video> element."""
    head = data[:64]
    if head[4:8] == b"ftyp":
        return "video/quicktime" if head[8:10] == b"qt" else "video/mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video/webm"
    if head.startswith(b"OggS"):
        return "video/ogg"
    if head[:4] == b"RIFF" and head[8:11] == b"AVI":
        return "video/x-msvideo"
    return "application/octet-stream"

