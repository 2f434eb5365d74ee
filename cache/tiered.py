"""A hot in-process tier in front of a shared cold tier (normally Redis).

Reads try the hot tier first and ask the cold tier only for what it lacks; what the cold tier
returns is promoted into the hot tier, so asking again about the same video moves no bytes over
the network (``tier_stats()["cold"].bytes_read`` stays put). Writes go to both tiers.

This is also where cold-tier outages (:class:`CacheUnavailableError`) are absorbed: a cache must
not turn a Redis outage into failed requests. A failing cold read counts as misses (the caller
recomputes), a failing cold write is logged; both increment ``errors``. ``ping()`` still reports
the cold tier's health, and ``delete_video`` lets the error through, since a user's deletion must
not half-succeed silently.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import torch

from cache.errors import CacheUnavailableError
from cache.manifest import Manifest
from cache.memory import MemoryFeatureStore
from cache.store import CacheStats, FeatureStore, check_manifest_sampling_id, stack_frames

logger = logging.getLogger(__name__)


class TieredFeatureStore:
    """``hot`` (a :class:`MemoryFeatureStore`) in front of ``cold`` (any ``FeatureStore``)."""

    def __init__(self, hot: MemoryFeatureStore, cold: FeatureStore) -> None:
        self.hot = hot
        self.cold = cold
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("queries", "hits", "misses", "errors"), 0)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._counts[name] += delta

    async def get_frames(
        self, encoder_id: str, video_digest: str, indices: Sequence[int]
    ) -> list[torch.Tensor | None]:
        """Hot hits as they are; hot misses fetched from cold and promoted (on the hot device)."""
        results = await self.hot.get_frames(encoder_id, video_digest, indices)
        missing = [t for t, frame in enumerate(results) if frame is None]
        if missing:
            try:
                fetched = await self.cold.get_frames(encoder_id, video_digest, [indices[t] for t in missing])
            except CacheUnavailableError as error:
                logger.warning("cold tier read failed, treating %d frames as misses: %r", len(missing), error)
                self._count(errors=1)
                fetched = [None] * len(missing)
            found = [(t, frame) for t, frame in zip(missing, fetched, strict=True) if frame is not None]
            if found:
                promoted = self.hot.adopt_frames(
                    encoder_id, video_digest, [indices[t] for t, _ in found], [frame for _, frame in found]
                )
                for (t, _), frame in zip(found, promoted, strict=True):
                    results[t] = frame
        hits = sum(frame is not None for frame in results)
        self._count(queries=len(results), hits=hits, misses=len(results) - hits)
        return results

    async def put_frames(
        self, encoder_id: str, video_digest: str, indices: Sequence[int], features: torch.Tensor
    ) -> int:
        """Write to the hot tier, then to the cold one (a cold failure is logged, not raised).
        Frames stored already are counted in the cold tier, the one other workers share."""
        stored = await self.hot.put_frames(encoder_id, video_digest, indices, features)
        try:
            return await self.cold.put_frames(encoder_id, video_digest, indices, features)
        except CacheUnavailableError as error:
            logger.warning("cold tier write of %d frames failed: %r", len(indices), error)
            self._count(errors=1)
            return stored

    async def get_video(self, manifest: Manifest) -> torch.Tensor | None:
        """[T, N, C] on the hot tier's device if every frame is in some tier, else ``None``."""
        frames = await self.get_frames(manifest.encoder_id, manifest.video_digest, manifest.frame_indices)
        return stack_frames(frames)

    async def get_manifest(self, encoder_id: str, video_digest: str, sampling_id: str) -> Manifest | None:
        """Hot first, then cold (promoting what cold had)."""
        manifest = await self.hot.get_manifest(encoder_id, video_digest, sampling_id)
        if manifest is None:
            try:
                manifest = await self.cold.get_manifest(encoder_id, video_digest, sampling_id)
            except CacheUnavailableError as error:
                logger.warning("cold tier manifest read failed: %r", error)
                self._count(errors=1)
            if manifest is not None:
                await self.hot.put_manifest(manifest, sampling_id)
        hit = manifest is not None
        self._count(queries=1, hits=int(hit), misses=int(not hit))
        return manifest

    async def put_manifest(self, manifest: Manifest, sampling_id: str | None = None) -> None:
        """Write to both tiers."""
        sid = check_manifest_sampling_id(manifest, sampling_id)
        await self.hot.put_manifest(manifest, sid)
        try:
            await self.cold.put_manifest(manifest, sid)
        except CacheUnavailableError as error:
            logger.warning("cold tier manifest write failed: %r", error)
            self._count(errors=1)

    async def delete_video(self, video_digest: str) -> int:
        """Delete from both tiers; returns the number of entries removed, summed over the tiers."""
        return await self.hot.delete_video(video_digest) + await self.cold.delete_video(video_digest)

    async def ping(self) -> bool:
        """The cold tier's health (the hot tier is always there)."""
        return await self.cold.ping()

    def tier_stats(self) -> dict[str, CacheStats]:
        """Each tier's own counters: ``{"hot": ..., "cold": ...}``."""
        return {"hot": self.hot.stats(), "cold": self.cold.stats()}

    def stats(self) -> CacheStats:
        """The caller's view: lookups answered by either tier; bytes and sizes summed over tiers."""
        hot, cold = self.hot.stats(), self.cold.stats()

        def total(name: str) -> int | None:
            values = [getattr(s, name) for s in (hot, cold) if getattr(s, name) is not None]
            return sum(values) if values else None

        with self._lock:
            counts = dict(self._counts)
        return CacheStats(
            queries=counts["queries"],
            hits=counts["hits"],
            misses=counts["misses"],
            corrupt=hot.corrupt + cold.corrupt,
            errors=counts["errors"] + hot.errors + cold.errors,
            bytes_read=hot.bytes_read + cold.bytes_read,
            bytes_written=hot.bytes_written + cold.bytes_written,
            bytes_stored=total("bytes_stored"),
            entries=total("entries"),
            evictions=total("evictions"),
        )

    async def close(self) -> None:
        """Close both tiers."""
        await self.hot.close()
        await self.cold.close()
