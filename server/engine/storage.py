"""Where the service keeps media bytes and video records, behind two small interfaces.

``MediaStore`` holds the bytes of uploaded or fetched media by content digest, so a worker can
(re-)extract a video whose features were evicted. ``VideoRegistry`` holds the status records
that ``/v1/videos`` reports and that questions wait on. This module has the embedded
implementations (a bounded folder, a dict); ``server.engine.redis.storage`` has the shared ones.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from .jobs import Sampling, VideoRecord


class MediaStore(Protocol):
    async def put(self, digest: str, data: bytes) -> None: ...
    async def get(self, digest: str) -> bytes | None: ...
    async def delete(self, digest: str) -> None: ...


class VideoRegistry(Protocol):
    async def put(self, record: VideoRecord) -> None: ...
    async def get(self, video_id: str) -> VideoRecord | None: ...
    async def update(self, video_id: str, **changes: object) -> VideoRecord | None: ...
    async def delete(self, video_id: str) -> VideoRecord | None: ...
    async def find(self, digest: str, sampling: Sampling, subtitles: str | None = None) -> VideoRecord | None: ...
    async def by_digest(self, digest: str) -> list[VideoRecord]: ...
    async def claim(self, video_id: str, stale_after: float) -> bool: ...
    def watch(self, video_id: str, timeout: float) -> AsyncIterator[VideoRecord]: ...


class DiskMediaStore:
    """Media bytes as files named by digest, evicting least recently used past ``max_bytes``."""

    def __init__(self, folder: str | os.PathLike | None, max_bytes: int) -> None:
        self._tmp = None if folder else tempfile.TemporaryDirectory(prefix="llamavid-media-")
        self.folder = Path(folder or self._tmp.name)  # type: ignore[union-attr]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def _path(self, digest: str) -> Path:
        if not digest.isalnum():
            raise ValueError(f"invalid digest {digest!r}")
        return self.folder / digest

    async def put(self, digest: str, data: bytes) -> None:
        await asyncio.to_thread(self._put, digest, data)

    def _put(self, digest: str, data: bytes) -> None:
        path = self._path(digest)
        with self._lock:
            if not path.exists():
                tmp = path.with_suffix(f".tmp{threading.get_ident()}")
                tmp.write_bytes(data)
                tmp.replace(path)
            os.utime(path)
            self._evict(keep=path)

    async def get(self, digest: str) -> bytes | None:
        return await asyncio.to_thread(self._get, digest)

    def _get(self, digest: str) -> bytes | None:
        path = self._path(digest)
        try:
            data = path.read_bytes()
            os.utime(path)
            return data
        except FileNotFoundError:
            return None

    async def delete(self, digest: str) -> None:
        self._path(digest).unlink(missing_ok=True)

    def _evict(self, keep: Path) -> None:
        files = [p for p in self.folder.iterdir() if p.is_file() and p.suffix == ""]
        total = sum(p.stat().st_size for p in files)
        for path in sorted(files, key=lambda p: p.stat().st_mtime):
            if total <= self.max_bytes:
                break
            if path != keep:
                total -= path.stat().st_size
                path.unlink(missing_ok=True)


class MemoryVideoRegistry:
    """Video records in a dict; watchers wake on every update."""

    def __init__(self) -> None:
        self._records: dict[str, VideoRecord] = {}
        self._changed = asyncio.Condition()
        self._version = 0  # bumped on every change, so a watcher cannot miss one between checks

    def _bump(self) -> None:
        self._version += 1
        self._changed.notify_all()

    async def put(self, record: VideoRecord) -> None:
        async with self._changed:
            self._records[record.id] = record
            self._bump()

    async def get(self, video_id: str) -> VideoRecord | None:
        record = self._records.get(video_id)
        return record.model_copy(deep=True) if record else None

    async def update(self, video_id: str, **changes: object) -> VideoRecord | None:
        async with self._changed:
            record = self._records.get(video_id)
            if record is None:
                return None
            for key, value in changes.items():
                setattr(record, key, value)
            record.updated_at = time.time()
            self._bump()
            return record.model_copy(deep=True)

    async def delete(self, video_id: str) -> VideoRecord | None:
        async with self._changed:
            record = self._records.pop(video_id, None)
            self._bump()
            return record

    async def find(self, digest: str, sampling: Sampling, subtitles: str | None = None) -> VideoRecord | None:
        for record in self._records.values():
            if record.digest == digest and record.sampling == sampling and record.subtitles == subtitles \
                    and record.status != "failed":
                return record.model_copy(deep=True)
        return None

    async def by_digest(self, digest: str) -> list[VideoRecord]:
        return [r.model_copy(deep=True) for r in self._records.values() if r.digest == digest]

    async def claim(self, video_id: str, stale_after: float) -> bool:
        """Mark the video as being extracted by the caller, unless someone else is at it."""
        async with self._changed:
            record = self._records.get(video_id)
            if record is None:
                return True
            if record.status == "extracting" and time.time() - record.updated_at <= stale_after:
                return False
            record.status, record.updated_at = "extracting", time.time()
            self._bump()
            return True

    async def watch(self, video_id: str, timeout: float) -> AsyncIterator[VideoRecord]:
        """Yield the record now and after every change, until it is ready/failed/gone or ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self._version
            record = await self.get(video_id)
            if record is None:
                return
            yield record
            if record.terminal:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait_for(lambda: self._version != seen), remaining)
                except asyncio.TimeoutError:
                    return
