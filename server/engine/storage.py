"""Where the service keeps media bytes and video records, behind two small interfaces.

``MediaStore`` holds the bytes of uploaded or fetched media by content digest, so a worker can
(re-)extract a video whose features were evicted. ``VideoRegistry`` holds the status records
that ``/v1/videos`` reports and that questions wait on. ``RangeBoard`` hands out the frame ranges
of one video's extraction to the workers sharing it. This module has the embedded
implementations (a bounded folder, dicts); ``server.engine.redis.storage`` has the shared ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .jobs import Sampling, VideoRecord


class MediaStore(Protocol):
    async def put(self, digest: str, data: bytes) -> None: ...
    async def get(self, digest: str) -> bytes | None: ...
    async def has(self, digest: str) -> bool: ...  # whether the bytes are stored, without reading them
    async def copy_to(self, digest: str, path: Path) -> bool: ...  # into a file, never whole in memory
    async def delete(self, digest: str) -> None: ...
    # A client's name for media it sent (vLLM's ``uuid`` on a media part): a small JSON value naming
    # the video record or image digest, kept as long as media (LRU embedded, the cache TTL in Redis).
    async def name(self, uuid: str, value: str) -> None: ...
    async def named(self, uuid: str) -> str | None: ...


MAX_MEDIA_NAMES = 65_536  # uuids an embedded server remembers (least recently used forgotten first)


@dataclass(frozen=True)
class RangeClaim:
    """Range ``index`` of a board (frames ``[index * size, (index + 1) * size)`` of the sampled
    frames), now held by the caller; ``resumed``: its previous holder's lease ran out."""

    index: int
    size: int
    resumed: bool


@dataclass(frozen=True)
class BoardState:
    count: int  # ranges on the board (0: no board)
    done: int  # ranges finished
    frames: int  # frames cached so far, summed over every holder
    skipped: list[int]  # sampled frames that could not be decoded, from the finished ranges

    @property
    def complete(self) -> bool:
        return self.count > 0 and self.done == self.count


class RangeBoard(Protocol):
    """The ranges of one video's extraction (``board`` names the video, encoder and sampling).

    The extraction's owner ``create``s the board (a board already there is kept: the owner took
    over from a dead one) and ``delete``s it once the manifest is written. ``claim`` atomically
    takes a range nobody holds (``pick_range``: the one after the caller's last, so that its decoder
    reads on without seeking), or, once those are gone, one whose holder stopped renewing its lease
    (it died: its range is resumed, not restarted, since every chunk it finished is cached);
    ``None`` when there is nothing to take or no board (a helper that came too late).
    """

    async def create(self, board: str, count: int, size: int) -> int: ...
    async def claim(self, board: str, holder: str, lease: float, after: int | None = None) -> RangeClaim | None: ...
    async def renew(self, board: str, holder: str, index: int, lease: float) -> bool: ...
    async def finish(self, board: str, index: int, skipped: list[int]) -> None: ...
    async def add_frames(self, board: str, frames: int) -> int: ...
    async def state(self, board: str) -> BoardState: ...
    async def delete(self, board: str) -> None: ...


def pick_range(free: set[int], count: int, after: int | None) -> int | None:
    """Which free range a holder takes: the one after its last (its decoder reads on, no seek),
    else the middle of the longest run of free ranges (the holder working just before that run
    keeps its first half), or the run's start when nothing precedes it. ``None``: none is free."""
    if after is not None and after + 1 in free:
        return after + 1
    best_start, best_len, i = -1, 0, 0
    while i < count:
        if i in free:
            j = i
            while j in free:
                j += 1
            if j - i > best_len:
                best_start, best_len = i, j - i
            i = j
        else:
            i += 1
    if best_len == 0:
        return None
    return best_start if best_start == 0 else best_start + best_len // 2


class VideoRegistry(Protocol):
    async def put(self, record: VideoRecord) -> None: ...
    async def get(self, video_id: str) -> VideoRecord | None: ...
    async def update(self, video_id: str, **changes: object) -> VideoRecord | None: ...
    async def delete(self, video_id: str) -> VideoRecord | None: ...
    async def find(self, digest: str, sampling: Sampling, subtitles: str | None = None) -> VideoRecord | None: ...
    async def by_digest(self, digest: str) -> list[VideoRecord]: ...
    async def claim(self, video_id: str, stale_after: float) -> bool: ...
    async def advance(self, video_id: str, frames_done: int) -> None: ...
    def watch(self, video_id: str, timeout: float) -> AsyncIterator[VideoRecord]: ...


class DiskMediaStore:
    """Media bytes as files named by digest, evicting least recently used past ``max_bytes``."""

    def __init__(self, folder: str | os.PathLike | None, max_bytes: int) -> None:
        self._tmp = None if folder else tempfile.TemporaryDirectory(prefix="llamavid-media-")
        self.folder = Path(folder or self._tmp.name)  # type: ignore[union-attr]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._names: OrderedDict[str, str] = OrderedDict()

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

    async def has(self, digest: str) -> bool:
        return self._path(digest).exists()

    async def name(self, uuid: str, value: str) -> None:
        self._names[uuid] = value
        self._names.move_to_end(uuid)
        while len(self._names) > MAX_MEDIA_NAMES:
            self._names.popitem(last=False)

    async def named(self, uuid: str) -> str | None:
        value = self._names.get(uuid)
        if value is not None:
            self._names.move_to_end(uuid)
        return value

    async def copy_to(self, digest: str, path: Path) -> bool:
        """Copy the media into ``path`` (the kernel copies; False when it is not stored)."""
        try:
            await asyncio.to_thread(shutil.copyfile, self._path(digest), path)
        except FileNotFoundError:
            return False
        with contextlib.suppress(FileNotFoundError):  # in use: the last to be evicted
            os.utime(self._path(digest))
        return True

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

    async def advance(self, video_id: str, frames_done: int) -> None:
        """Progress that only moves forward, whatever order the reports of several workers arrive in."""
        async with self._changed:
            record = self._records.get(video_id)
            if record is not None and frames_done > record.frames_done and record.status == "extracting":
                record.frames_done, record.updated_at = frames_done, time.time()
                self._bump()

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


@dataclass
class _Board:
    count: int
    size: int
    holders: dict[int, tuple[str, float]] = field(default_factory=dict)  # index: (holder, lease end)
    done: dict[int, list[int]] = field(default_factory=dict)  # index: its skipped frames
    frames: int = 0


class MemoryRangeBoard:
    """The boards of one process (an embedded server has one worker: it takes every range)."""

    def __init__(self) -> None:
        self._boards: dict[str, _Board] = {}

    async def create(self, board: str, count: int, size: int) -> int:
        """The board's range size (the first creator's)."""
        return self._boards.setdefault(board, _Board(count, size)).size

    async def claim(self, board: str, holder: str, lease: float, after: int | None = None) -> RangeClaim | None:
        b = self._boards.get(board)
        if b is None:
            return None
        now = time.monotonic()
        free = {i for i in range(b.count) if i not in b.done and i not in b.holders}
        expired = [i for i in range(b.count) if i not in b.done and i in b.holders and b.holders[i][1] < now]
        index, resumed = pick_range(free, b.count, after), False
        if index is None and expired:
            index, resumed = expired[0], True
        if index is None:
            return None
        b.holders[index] = (holder, now + lease)
        return RangeClaim(index, b.size, resumed)

    async def renew(self, board: str, holder: str, index: int, lease: float) -> bool:
        b = self._boards.get(board)
        if b is None or b.holders.get(index, ("",))[0] != holder:
            return False
        b.holders[index] = (holder, time.monotonic() + lease)
        return True

    async def finish(self, board: str, index: int, skipped: list[int]) -> None:
        if (b := self._boards.get(board)) is not None:
            b.done[index] = list(skipped)

    async def add_frames(self, board: str, frames: int) -> int:
        b = self._boards.get(board)
        if b is None:
            return 0
        b.frames += frames
        return b.frames

    async def state(self, board: str) -> BoardState:
        b = self._boards.get(board)
        if b is None:
            return BoardState(0, 0, 0, [])
        return BoardState(b.count, len(b.done), b.frames, sorted(i for s in b.done.values() for i in s))

    async def delete(self, board: str) -> None:
        self._boards.pop(board, None)
