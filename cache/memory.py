"""In-process, byte-bounded LRU store of feature tensors: the worker's hot tier.

Tensors are kept as tensors (no serialisation), cast to one dtype (float16 by default) and
optionally placed on a device, so on a GPU worker a repeated question costs no host-to-device copy.
Whole entries are evicted, least recently used first, until the stored bytes fit ``max_bytes``;
an entry larger than ``max_bytes`` is not stored at all rather than flushing everything else.

One ``threading.Lock`` guards the table because the worker thread and the event loop both use
it. The async methods are thin wrappers over the ``*_sync`` ones, which a thread can call directly.

Returned tensors are the stored ones, not copies: treat them as read-only.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from cache.keys import check_digest, check_frame_index, check_sampling_id, encoder_tag
from cache.manifest import Manifest
from cache.store import CacheStats, check_features, check_manifest_sampling_id, stack_frames

# ("f", encoder_id, video_digest, frame_index) or ("m", encoder_id, video_digest, sampling_id)
_Key = tuple[str, str, str, object]


_COUNTERS = ("queries", "hits", "misses", "bytes_read", "bytes_written", "evictions")


class MemoryFeatureStore:
    """Byte-bounded LRU of per-frame features and manifests (implements ``FeatureStore``)."""

    def __init__(
        self,
        max_bytes: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float16,
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self._entries: OrderedDict[_Key, tuple[torch.Tensor | Manifest, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._bytes = 0
        self._counts = dict.fromkeys(_COUNTERS, 0)

    # -- internals (call with the lock held) ---------------------------------------------------

    def _insert(self, key: _Key, value: torch.Tensor | Manifest, nbytes: int) -> bool:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        if nbytes > self.max_bytes:
            return False
        while self._bytes + nbytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._bytes -= evicted
            self._counts["evictions"] += 1
        self._entries[key] = (value, nbytes)
        self._bytes += nbytes
        self._counts["bytes_written"] += nbytes
        return True

    def _lookup(self, key: _Key) -> torch.Tensor | Manifest | None:
        self._counts["queries"] += 1
        entry = self._entries.get(key)
        if entry is None:
            self._counts["misses"] += 1
            return None
        self._entries.move_to_end(key)
        self._counts["hits"] += 1
        self._counts["bytes_read"] += entry[1]
        return entry[0]

    def _frame_keys(self, encoder_id: str, video_digest: str, indices: Sequence[int]) -> list[_Key]:
        encoder_tag(encoder_id)  # same argument checks as the Redis backend's keys
        check_digest(video_digest)
        return [("f", encoder_id, video_digest, check_frame_index(i)) for i in indices]

    def _own(self, frame: torch.Tensor) -> torch.Tensor:
        """A tensor only this store references, contiguous, in the store's dtype and device."""
        return frame.detach().to(device=self.device, dtype=self.dtype, copy=True).contiguous()

    # -- synchronous API (for worker threads) ------------------------------------------------

    def get_frames_sync(
        self, encoder_id: str, video_digest: str, indices: Sequence[int]
    ) -> list[torch.Tensor | None]:
        """Blocking :meth:`get_frames`."""
        keys = self._frame_keys(encoder_id, video_digest, indices)
        with self._lock:
            return [self._lookup(key) for key in keys]  # type: ignore[misc]

    def put_frames_sync(
        self, encoder_id: str, video_digest: str, indices: Sequence[int], features: torch.Tensor
    ) -> int:
        """Blocking :meth:`put_frames`; copies each frame so eviction frees real memory."""
        check_features(indices, features)
        keys = self._frame_keys(encoder_id, video_digest, indices)
        frames = [self._own(features[t]) for t in range(len(keys))]  # copy outside the lock
        with self._lock:
            stored = sum(key in self._entries for key in keys)
            for key, frame in zip(keys, frames, strict=True):
                self._insert(key, frame, frame.nbytes)
        return stored

    def holds(self, encoder_id: str, video_digest: str, indices: Sequence[int]) -> bool:
        """Whether every one of these frames is stored (not counted as a lookup, not marked as used)."""
        keys = self._frame_keys(encoder_id, video_digest, indices)
        with self._lock:
            return all(key in self._entries for key in keys)

    def adopt_frames(
        self, encoder_id: str, video_digest: str, indices: Sequence[int], frames: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Store frames the caller hands over (e.g. just decoded from a colder tier).

        Unlike :meth:`put_frames_sync` no copy is made when a frame already has the store's
        dtype and device, so the caller must not modify them afterwards. Returns the frames as
        stored (on the store's device), also for frames too large to keep.
        """
        keys = self._frame_keys(encoder_id, video_digest, indices)
        if len(frames) != len(keys):
            raise ValueError(f"{len(frames)} frames for {len(keys)} indices")
        owned = [f.detach().to(device=self.device, dtype=self.dtype).contiguous() for f in frames]
        with self._lock:
            for key, frame in zip(keys, owned, strict=True):
                self._insert(key, frame, frame.nbytes)
        return owned

    def get_video_sync(self, manifest: Manifest) -> torch.Tensor | None:
        """Blocking :meth:`get_video`."""
        frames = self.get_frames_sync(manifest.encoder_id, manifest.video_digest, manifest.frame_indices)
        return stack_frames(frames)

    # -- FeatureStore ------------------------------------------------------------------------

    async def get_frames(
        self, encoder_id: str, video_digest: str, indices: Sequence[int]
    ) -> list[torch.Tensor | None]:
        """Stored features per index (on :attr:`device`, in :attr:`dtype`), ``None`` where absent."""
        return self.get_frames_sync(encoder_id, video_digest, indices)

    async def put_frames(
        self, encoder_id: str, video_digest: str, indices: Sequence[int], features: torch.Tensor
    ) -> int:
        """Store ``features[t]`` as source frame ``indices[t]``; how many were stored already."""
        return self.put_frames_sync(encoder_id, video_digest, indices, features)

    async def get_video(self, manifest: Manifest) -> torch.Tensor | None:
        """[T, N, C] stack of the manifest's frames if all are present, else ``None``."""
        return self.get_video_sync(manifest)

    async def get_manifest(self, encoder_id: str, video_digest: str, sampling_id: str) -> Manifest | None:
        """The stored manifest, if any."""
        encoder_tag(encoder_id)
        key = ("m", encoder_id, check_digest(video_digest), check_sampling_id(sampling_id))
        with self._lock:
            return self._lookup(key)  # type: ignore[return-value]

    async def put_manifest(self, manifest: Manifest, sampling_id: str | None = None) -> None:
        """Store a manifest; its size counts as the length of its JSON form."""
        sid = check_manifest_sampling_id(manifest, sampling_id)
        nbytes = len(manifest.to_json())
        with self._lock:
            self._insert(("m", manifest.encoder_id, manifest.video_digest, sid), manifest, nbytes)

    async def delete_video(self, video_digest: str) -> int:
        """Drop every entry of the video; returns how many there were."""
        check_digest(video_digest)
        with self._lock:
            doomed = [key for key in self._entries if key[2] == video_digest]
            for key in doomed:
                self._bytes -= self._entries.pop(key)[1]
        return len(doomed)

    async def ping(self) -> bool:
        """Always reachable."""
        return True

    def stats(self) -> CacheStats:
        """Counters plus the current size of the table."""
        with self._lock:
            return CacheStats(bytes_stored=self._bytes, entries=len(self._entries), **self._counts)

    def clear(self) -> None:
        """Drop every entry (counters are kept)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    async def close(self) -> None:
        """Free the stored tensors (GPU memory included)."""
        self.clear()
