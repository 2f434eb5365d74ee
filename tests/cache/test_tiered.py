"""Hot tier in front of Redis: repeated reads stay local, cold hits are promoted, outages degrade."""

from __future__ import annotations

import pytest
import torch

from cache.memory import MemoryFeatureStore
from cache.redis import RedisFeatureStore
from cache.store import FeatureStore
from cache.tiered import TieredFeatureStore
from tests.cache.factories import ENCODER, features, manifest_for, video_digest

DIGEST = video_digest("tiered")
FRAME_BYTES = 17 * 176 * 2


@pytest.fixture
def tiered(redis_store: RedisFeatureStore) -> TieredFeatureStore:
    return TieredFeatureStore(MemoryFeatureStore(64 * FRAME_BYTES), redis_store)


async def test_repeated_read_moves_no_cold_bytes(tiered: TieredFeatureStore) -> None:
    assert isinstance(tiered, FeatureStore)
    manifest = manifest_for(DIGEST, [0, 30, 60, 90])
    x = features(4)
    await tiered.put_manifest(manifest)
    await tiered.put_frames(ENCODER, DIGEST, manifest.frame_indices, x)
    cold_before = tiered.tier_stats()["cold"]

    assert await tiered.get_manifest(ENCODER, DIGEST, manifest.sampling_id) == manifest
    assert torch.equal(await tiered.get_video(manifest), x)
    assert torch.equal(await tiered.get_video(manifest), x)

    cold = tiered.tier_stats()["cold"]
    assert cold.bytes_read == cold_before.bytes_read == 0
    assert cold.queries == cold_before.queries == 0
    hot = tiered.tier_stats()["hot"]
    assert hot.hits == 1 + 2 * 4
    combined = tiered.stats()
    assert (combined.queries, combined.hits, combined.misses) == (9, 9, 0)


async def test_cold_hit_is_promoted(redis_store: RedisFeatureStore) -> None:
    # A second process wrote the video to Redis; this process's hot tier is empty.
    x = features(4)
    manifest = manifest_for(DIGEST, [0, 30, 60, 90])
    await redis_store.put_frames(ENCODER, DIGEST, manifest.frame_indices, x)
    await redis_store.put_manifest(manifest)
    hot = MemoryFeatureStore(64 * FRAME_BYTES)
    tiered = TieredFeatureStore(hot, redis_store)

    assert await tiered.get_manifest(ENCODER, DIGEST, manifest.sampling_id) == manifest
    assert torch.equal(await tiered.get_video(manifest), x)
    first = tiered.tier_stats()["cold"]
    assert first.hits == 1 + 4 and first.bytes_read > 0
    assert hot.stats().entries == 5

    assert torch.equal(await tiered.get_video(manifest), x)
    assert await tiered.get_manifest(ENCODER, DIGEST, manifest.sampling_id) == manifest
    second = tiered.tier_stats()["cold"]
    assert second.bytes_read == first.bytes_read and second.queries == first.queries


async def test_only_hot_misses_go_to_cold(tiered: TieredFeatureStore, redis_store: RedisFeatureStore) -> None:
    x = features(6)
    await redis_store.put_frames(ENCODER, DIGEST, range(6), x)
    await tiered.hot.put_frames(ENCODER, DIGEST, [0, 1, 2], x[:3])
    got = await tiered.get_frames(ENCODER, DIGEST, [0, 1, 2, 3, 4, 5, 6])
    assert [f is not None for f in got] == [True] * 6 + [False]
    assert torch.equal(torch.stack(got[:6]), x)
    cold = tiered.tier_stats()["cold"]
    assert (cold.queries, cold.hits, cold.misses) == (4, 3, 1)
    combined = tiered.stats()
    assert (combined.queries, combined.hits, combined.misses) == (7, 6, 1)


async def test_hot_eviction_falls_back_to_cold(redis_store: RedisFeatureStore) -> None:
    tiered = TieredFeatureStore(MemoryFeatureStore(2 * FRAME_BYTES), redis_store)
    manifest = manifest_for(DIGEST, [0, 1, 2, 3])
    x = features(4)
    await tiered.put_frames(ENCODER, DIGEST, manifest.frame_indices, x)
    assert tiered.hot.stats().entries == 2
    assert torch.equal(await tiered.get_video(manifest), x)  # larger than the hot tier: still served


async def test_delete_video_hits_both_tiers(tiered: TieredFeatureStore) -> None:
    manifest = manifest_for(DIGEST, [0, 1])
    await tiered.put_frames(ENCODER, DIGEST, [0, 1], features(2))
    await tiered.put_manifest(manifest)
    assert await tiered.delete_video(DIGEST) == 6  # 3 hot + 3 cold
    assert await tiered.get_video(manifest) is None
    assert await tiered.get_manifest(ENCODER, DIGEST, manifest.sampling_id) is None


async def test_cold_outage_degrades_to_misses() -> None:
    hot = MemoryFeatureStore(64 * FRAME_BYTES)
    tiered = TieredFeatureStore(hot, RedisFeatureStore.from_url("redis://127.0.0.1:1/0"))
    manifest = manifest_for(DIGEST, [0, 1])
    x = features(2)
    assert await tiered.ping() is False
    await tiered.put_frames(ENCODER, DIGEST, [0, 1], x)  # hot keeps it, cold failure is logged
    await tiered.put_manifest(manifest)
    assert torch.equal(await tiered.get_video(manifest), x)
    assert await tiered.get_frames(ENCODER, DIGEST, [5]) == [None]
    assert await tiered.get_manifest(ENCODER, video_digest("x"), manifest.sampling_id) is None
    assert tiered.stats().errors == 4
    await tiered.close()


async def test_gpu_hot_tier_returns_device_tensors(redis_store: RedisFeatureStore) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    tiered = TieredFeatureStore(MemoryFeatureStore(64 * FRAME_BYTES, device="cuda"), redis_store)
    x = features(3)
    await redis_store.put_frames(ENCODER, DIGEST, [0, 1, 2], x)
    video = await tiered.get_video(manifest_for(DIGEST, [0, 1, 2]))
    assert video.device.type == "cuda" and torch.equal(video.cpu(), x)


async def test_a_frame_stored_twice_is_counted_and_kept(redis_store: RedisFeatureStore) -> None:
    """Keys are content addresses: a second put of the same frames is work done twice, which the
    store reports (the service's recomputed-frames metric), and writes no bytes to Redis again."""
    other = TieredFeatureStore(MemoryFeatureStore(64 * FRAME_BYTES), redis_store)  # another worker's
    mine = TieredFeatureStore(MemoryFeatureStore(64 * FRAME_BYTES), redis_store)
    x = features(4)
    assert await other.put_frames(ENCODER, DIGEST, [0, 1], x[:2]) == 0
    written = redis_store.stats().bytes_written
    assert await mine.put_frames(ENCODER, DIGEST, [0, 1, 2, 3], x) == 2  # counted in the shared tier
    assert redis_store.stats().bytes_written == written + written  # only frames 2 and 3 were sent
    assert not mine.hot.holds(ENCODER, DIGEST, [4]) and mine.hot.holds(ENCODER, DIGEST, [0, 1, 2, 3])
    hot_queries = mine.hot.stats().queries
    assert torch.equal(torch.stack(await mine.get_frames(ENCODER, DIGEST, [0, 1, 2, 3])), x)
    assert mine.hot.stats().queries == hot_queries + 4  # holds() is not a lookup
    memory = MemoryFeatureStore(64 * FRAME_BYTES)
    assert await memory.put_frames(ENCODER, DIGEST, [0, 1], x[:2]) == 0
    assert await memory.put_frames(ENCODER, DIGEST, [1, 2], x[1:3]) == 1
