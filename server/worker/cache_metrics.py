"""Feeds the feature cache's own counters into Prometheus (``cache/`` does not import ``server/``).

``sync()`` adds what each tier counted since the last call, so it can run after every cache
access without double counting.
"""

from __future__ import annotations

from cache import CacheStats, FeatureStore, TieredFeatureStore

from ..metrics import LlamaVidMetrics


class CacheMetrics:
    def __init__(self, metrics: LlamaVidMetrics, store: FeatureStore) -> None:
        self.metrics = metrics
        self.store = store
        self._last: dict[str, CacheStats] = {}

    def _tiers(self) -> dict[str, CacheStats]:
        if isinstance(self.store, TieredFeatureStore):
            return self.store.tier_stats()
        name = "memory" if type(self.store).__name__.startswith("Memory") else "cold"
        return {name: self.store.stats()}

    def sync(self) -> None:
        m = self.metrics
        for tier, now in self._tiers().items():
            last = self._last.get(tier, CacheStats())
            m.feature_cache_queries.labels(tier=tier).inc(max(0, now.queries - last.queries))
            m.feature_cache_hits.labels(tier=tier).inc(max(0, now.hits - last.hits))
            m.feature_cache_bytes_read.labels(tier=tier).inc(max(0, now.bytes_read - last.bytes_read))
            if now.bytes_stored is not None:
                m.set_cache_bytes(tier, now.bytes_stored)
            self._last[tier] = now
