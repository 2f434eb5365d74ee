"""The interface every feature-cache backend implements, and the statistics they report.

Backends: :class:`cache.memory.MemoryFeatureStore` (in-process LRU, the worker's hot tier),
:class:`cache.redis.RedisFeatureStore` (shared, survives restarts) and
:class:`cache.tiered.TieredFeatureStore` (the first in front of the second).

Methods are async because the Redis backend is; the in-memory one never awaits anything.
A corrupt entry is never served: backends delete it, count it and report a miss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

import torch

from cache.manifest import Manifest


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of a backend's counters since it was created.

    ``queries`` counts entries looked up (frames and manifests), each ending as one of ``hits``
    or ``misses``; a corrupt entry counts as a miss and in ``corrupt``. ``bytes_read`` and
    ``bytes_written`` are what moved out of and into the backend (serialised blob sizes for Redis,
    tensor sizes in memory). ``errors`` counts backend failures a tiered store absorbed.
    ``bytes_stored``, ``entries`` and ``evictions`` are ``None`` where the backend cannot know
    them cheaply (Redis evicts on its own).
    """

    queries: int = 0
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    errors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_stored: int | None = None
    entries: int | None = None
    evictions: int | None = None

    @property
    def hit_rate(self) -> float:
        """Fraction of lookups that hit (0.0 before the first lookup)."""
        return self.hits / self.queries if self.queries else 0.0

    def as_dict(self) -> dict[str, int | None]:
        """Plain dict, e.g. for a JSON status endpoint or metric export."""
        return asdict(self)


@runtime_checkable
class FeatureStore(Protocol):
    """A store of per-frame vision features and per-sampling manifests."""

    async def get_frames(
        self, encoder_id: str, video_digest: str, indices: Sequence[int]
    ) -> list[torch.Tensor | None]:
        """Features of each source frame in ``indices`` ([N, C] float16), ``None`` where missing."""
        ...

    async def put_frames(
        self, encoder_id: str, video_digest: str, indices: Sequence[int], features: torch.Tensor
    ) -> int:
        """Store ``features[t]`` ([T, N, C]) as the features of source frame ``indices[t]``.

        Returns how many of the frames were stored already. Keys are content addresses (encoder,
        video digest, frame), so a stored frame holds the same features: the count is work that was
        done twice (two workers encoding the same frames), which the service reports.
        """
        ...

    async def get_video(self, manifest: Manifest) -> torch.Tensor | None:
        """The [T, N, C] float16 stack of the manifest's frames, or ``None`` unless all are present."""
        ...

    async def get_manifest(self, encoder_id: str, video_digest: str, sampling_id: str) -> Manifest | None:
        """The manifest stored for this sampling of the video, if any."""
        ...

    async def put_manifest(self, manifest: Manifest, sampling_id: str | None = None) -> None:
        """Store a manifest under its sampling id (``sampling_id``, if given, must match it)."""
        ...

    async def delete_video(self, video_digest: str) -> int:
        """Remove every frame and manifest of the video, for any encoder; return how many."""
        ...

    async def ping(self) -> bool:
        """Whether the backend is reachable (for readiness checks; never raises)."""
        ...

    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        ...

    async def close(self) -> None:
        """Release connections or memory held by the store."""
        ...


def check_manifest_sampling_id(manifest: Manifest, sampling_id: str | None) -> str:
    """The manifest's own sampling id; a caller-supplied one must agree with it.

    The id is derived from ``manifest.sampling``, so a mismatch can only be a caller bug that
    would file the manifest where no lookup finds it.
    """
    own = manifest.sampling_id
    if sampling_id is not None and sampling_id != own:
        raise ValueError(f"sampling_id {sampling_id!r} does not match the manifest's sampling ({own!r})")
    return own


def stack_frames(frames: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """Stack per-frame features into [T, N, C], or ``None`` if any frame is missing or shapes differ."""
    if not frames or any(frame is None for frame in frames):
        return None
    first = frames[0]
    assert first is not None
    if any(frame.shape != first.shape for frame in frames):  # type: ignore[union-attr]
        return None
    return torch.stack(frames)  # type: ignore[arg-type]


def check_features(indices: Sequence[int], features: torch.Tensor) -> None:
    """``features`` must be [T, ...] with one row per index."""
    if features.dim() < 2 or features.shape[0] != len(indices):
        raise ValueError(f"expected features [T={len(indices)}, N, C], got {tuple(features.shape)}")
