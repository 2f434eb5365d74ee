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
from model.subtitles import SubtitleError, load_subtitles
from model.video import FrameSampling, VideoDecodeError, VideoFile, sample_indices

from ..engine.jobs import MediaRef, Sampling, SubtitleRef, VideoJob, VideoRecord, new_id
from ..engine.protocol import EngineClient, QueueFull
from ..fetch import FetchedMedia, MediaPolicy, decode_data_url, fetch_url, read_upload
from ..fetch.memo import UrlMemo
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
        self.subtitle_policy = MediaPolicy(max_bytes=settings.max_subtitle_bytes, **common)
        self.url_memo = UrlMemo(settings.url_memo_size)

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
        policy = {"video": self.video_policy, "image": self.image_policy, "subtitles": self.subtitle_policy}[kind]
        with self.metrics.stage("fetch"):
            if url.startswith("data:"):
                return decode_data_url(url, policy.max_bytes, kind=kind, field=field)
            return await fetch_url(url, policy, kind=kind, field=field)

    async def fetch_known(self, url: str, kind: str, field: str) -> tuple[str | None, FetchedMedia | None]:
        """A media URL's digest without downloading it again when the URL memo and the media store
        allow (fresh, or a 304 to a conditional request): ``(digest, None)``; else the download,
        ``(digest, fetched)``, remembered as its cache headers allow. A ``data:`` URL is decoded."""
        if url.startswith("data:"):
            fetched = await self.fetch(url, kind, field)
            return digest_bytes(fetched.data), fetched
        key = f"{kind} {url}"
        entry = self.url_memo.get(key)
        if entry is not None and not await self.engine.media.has(entry.digest):
            self.url_memo.forget(key)  # the bytes are gone: the digest alone is no use
            entry = None
        if entry is not None and entry.fresh(self.url_memo.now()):
            return entry.digest, None
        policy = {"video": self.video_policy, "image": self.image_policy}[kind]
        with self.metrics.stage("fetch"):
            fetched = await fetch_url(url, policy, kind=kind, field=field,
                                      validators=entry.validators() if entry is not None else None)
        if fetched.not_modified:
            self.url_memo.revalidated(key, entry, fetched.cache_headers)
            return entry.digest, None
        digest = await asyncio.to_thread(digest_bytes, fetched.data)
        self.url_memo.remember(key, digest, fetched.cache_headers)
        return digest, fetched

    async def upload(self, file, kind: str = "video", field: str = "file") -> FetchedMedia:
        limit = {"video": self.settings.max_video_bytes, "image": self.settings.max_image_bytes,
                 "subtitles": self.settings.max_subtitle_bytes}[kind]
        with self.metrics.stage("fetch"):
            return await read_upload(file, limit, kind, field=field)

    # -- subtitles ---------------------------------------------------------------------------------
    async def subtitles(self, value: str | None, field: str = "subtitles") -> SubtitleRef | None:
        """A request's ``subtitles`` field: "none", "auto", SRT/WebVTT text, or an http(s)/data: URL
        of a file (fetched under the same address guard as media). None: the field was not given."""
        if value is None:
            return None
        word = value.strip().lower()
        if word in ("none", "auto"):
            return SubtitleRef(source=word)
        if word.startswith(("http://", "https://", "data:")):
            with self.metrics.stage("fetch"):
                if word.startswith("data:"):
                    data = decode_data_url(value, self.settings.max_subtitle_bytes, kind="subtitles",
                                           field=field).data
                else:
                    data = (await fetch_url(value, self.subtitle_policy, kind="subtitles", field=field)).data
        else:
            data = value.encode("utf-8")
            if len(data) > self.settings.max_subtitle_bytes:
                raise APIError(413, f"{field} is larger than the {self.settings.max_subtitle_bytes}-byte limit",
                               code="media_too_large", param=field)
        return await self.keep_subtitles(data, field)

    async def keep_subtitles(self, data: bytes, field: str) -> SubtitleRef:
        """Check that the bytes are SRT or WebVTT with at least one cue, and store them for the worker."""
        try:
            cues = await asyncio.to_thread(load_subtitles, data)
        except SubtitleError as exc:
            raise APIError(400, f"{field}: {exc}", code="invalid_subtitles", param=field) from exc
        if not cues:
            raise APIError(400, f"{field}: the subtitles have no cue with text", code="invalid_subtitles",
                           param=field)
        digest = digest_bytes(data)
        await self.engine.media.put(digest, data)
        return SubtitleRef(source="file", digest=digest)

    # -- videos ------------------------------------------------------------------------------------
    async def video(self, data: bytes, sampling: Sampling, filename: str | None = None, *,
                    subtitles: SubtitleRef | None = None, digest: str | None = None) -> VideoRecord:
        """Register a video (or find the same bytes + sampling + subtitles already registered) and
        queue extraction. Subtitles uploaded with a video stay with its record, for its questions.
        ``digest``: the bytes' digest when the caller has it already (they are not hashed again)."""
        digest, info = await asyncio.to_thread(self._probe, data, digest)
        return await self._register(digest, info, len(data), sampling, filename, data, video_mime(data),
                                    subtitles=_attached(subtitles))

    def _probe(self, data: bytes, digest: str | None = None):
        try:
            with VideoFile(data) as video:
                info = video.info
        except VideoDecodeError as exc:
            raise APIError(415 if exc.code == "audio_only" else 400, str(exc), code=exc.code) from exc
        if info.duration > self.settings.max_video_seconds:
            raise APIError(413, f"the video is {info.duration:.0f}s long; this server accepts up to "
                                f"{self.settings.max_video_seconds:.0f}s", code="video_too_long")
        return digest or digest_bytes(data), info

    async def _register(self, digest, info, size, sampling: Sampling, filename, data: bytes | None,
                        content_type: str | None = None, *, subtitles: str | None = None) -> VideoRecord:
        planned = sample_indices(info, FrameSampling(sampling.fps, sampling.max_frames, sampling.start, sampling.end))
        if not planned:
            raise APIError(400, f"no frames to sample: the video is {info.duration:.1f}s long and the range starts at "
                                f"{sampling.start}s", code="empty_frame_range", param="start_time")
        existing = await self.engine.registry.find(digest, sampling, subtitles)
        if existing is not None:
            return existing
        if data is not None:
            await self.engine.media.put(digest, data)
        record = VideoRecord(
            id=new_id("vid"), digest=digest, sampling=sampling, frames_total=len(planned),
            timestamps=[round(t, 3) for t in info.times(planned)], content_type=content_type,
            duration=info.duration, source_fps=info.avg_fps, fps=sampling.fps, width=info.width,
            height=info.height, bytes=size, filename=filename, subtitles=subtitles,
            rotation=getattr(info, "rotation", 0),
        )
        await self.engine.registry.put(record)
        try:
            await self.engine.extract(VideoJob(video_id=record.id, digest=digest, sampling=record.sampling))
        except QueueFull:
            await self.engine.registry.delete(record.id)
            raise
        return record

    async def video_by_id(self, video_id: str, options: FrameOptions | None) -> VideoRecord:
        """An uploaded video; other sampling options make (or reuse) a sibling record of the same bytes
        (and subtitles)."""
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
        kept = SubtitleRef(source="file", digest=record.subtitles) if record.subtitles else None
        return await self.video(data, sampling, record.filename, subtitles=kept)

    async def video_from_url(self, url: str, options: FrameOptions | None, field: str, *,
                             subtitles: SubtitleRef | None = None) -> VideoRecord:
        if VIDEO_ID.match(url):
            return await self.video_by_id(url, options)
        sampling = self.sampling(options)
        name = url.rsplit("/", 1)[-1][:200] if "://" in url else None
        digest, fetched = await self.fetch_known(url, "video", field)
        if fetched is None:  # the URL's bytes are stored already (URL memo): no download, no hashing
            existing = await self.engine.registry.find(digest, sampling, _attached(subtitles))
            if existing is not None:
                return existing
            data = await self.engine.media.get(digest)
            if data is None:  # evicted meanwhile
                self.url_memo.forget(f"video {url}")
                return await self.video_from_url(url, options, field, subtitles=subtitles)
            return await self.video(data, sampling, name, subtitles=subtitles, digest=digest)
        return await self.video(fetched.data, sampling, name, subtitles=subtitles, digest=digest)

    # -- images ------------------------------------------------------------------------------------
    async def image(self, data: bytes, digest: str | None = None) -> MediaRef:
        try:
            await asyncio.to_thread(decode_image, data)
        except ImageDecodeError as exc:
            raise APIError(400, str(exc), code="invalid_image") from exc
        digest = digest or digest_bytes(data)
        await self.engine.media.put(digest, data)
        return MediaRef(kind="image", digest=digest)

    async def image_from_url(self, url: str, field: str) -> MediaRef:
        digest, fetched = await self.fetch_known(url, "image", field)
        if fetched is None:  # decoded and stored before (URL memo)
            return MediaRef(kind="image", digest=digest)
        return await self.image(fetched.data, digest)


def _attached(subtitles: SubtitleRef | None) -> str | None:
    """What a video record keeps of a request's subtitles: an uploaded file (its digest); "auto"
    and "none" are choices per question, not properties of the video."""
    return subtitles.digest if subtitles is not None and subtitles.source == "file" else None


def question_subtitles(requested: SubtitleRef | None, record: VideoRecord | None, *,
                       long_video: bool) -> SubtitleRef:
    """The subtitles a video question uses: what it asks for, else those uploaded with the video,
    else the container's own track (or a transcript) for a long-video checkpoint, which was
    trained with subtitles, and none for a short-video one, which was not."""
    if requested is not None:
        return requested
    if record is not None and record.subtitles:
        return SubtitleRef(source="file", digest=record.subtitles)
    return SubtitleRef(source="auto" if long_video else "none")


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

