"""Redis backend against a real server: round trips, misses, TTLs, corruption, deletion, chunking."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
import torch

from cache.errors import CacheUnavailableError
from cache.keys import FeatureKeys
from cache.redis import RedisFeatureStore
from cache.serialize import encode
from cache.store import FeatureStore
from tests.cache.factories import ENCODER, features, manifest_for, video_digest

DIGEST = video_digest("redis")


async def test_round_trip_and_stats(redis_store: RedisFeatureStore) -> None:
    assert isinstance(redis_store, FeatureStore)
    x = features(5)
    await redis_store.put_frames(ENCODER, DIGEST, [0, 10, 20, 30, 40], x)
    got = await redis_store.get_frames(ENCODER, DIGEST, [40, 0, 20])
    assert all(f.dtype == torch.float16 and f.device.type == "cpu" for f in got)
    assert torch.equal(torch.stack(got), x[[4, 0, 2]])
    stats = redis_store.stats()
    assert (stats.queries, stats.hits, stats.misses, stats.corrupt) == (3, 3, 0, 0)
    blob_size = len(encode(x[0]))
    assert stats.bytes_written == 5 * blob_size and stats.bytes_read == 3 * blob_size
    assert stats.bytes_stored is None and stats.entries is None


async def test_partial_hits(redis_store: RedisFeatureStore) -> None:
    x = features(3)
    await redis_store.put_frames(ENCODER, DIGEST, [1, 3, 5], x)
    got = await redis_store.get_frames(ENCODER, DIGEST, [0, 1, 2, 3, 4, 5])
    assert [f is not None for f in got] == [False, True, False, True, False, True]
    assert torch.equal(got[5], x[2])
    assert await redis_store.get_frames("another-encoder", DIGEST, [1]) == [None]
    stats = redis_store.stats()
    assert (stats.hits, stats.misses) == (3, 4)


async def test_frames_are_shared_across_samplings(redis_store: RedisFeatureStore) -> None:
    x = features(4)
    await redis_store.put_frames(ENCODER, DIGEST, [0, 30, 60, 90], x)  # 1 fps of a 30 fps video
    half_fps = manifest_for(DIGEST, [0, 60], fps=0.5)
    assert torch.equal(await redis_store.get_video(half_fps), x[[0, 2]])


async def test_ttl_is_set(redis_client: aioredis.Redis, namespace: str) -> None:
    store = RedisFeatureStore(redis_client, namespace=namespace, ttl_seconds=120)
    await store.put_frames(ENCODER, DIGEST, [7], features(1))
    manifest = manifest_for(DIGEST, [7])
    await store.put_manifest(manifest)
    keys = FeatureKeys(namespace)
    for key in (keys.frame(ENCODER, DIGEST, 7), keys.manifest(ENCODER, DIGEST, manifest.sampling_id)):
        assert 0 < await redis_client.ttl(key) <= 120


async def test_no_ttl_by_default(redis_store: RedisFeatureStore, redis_client: aioredis.Redis) -> None:
    await redis_store.put_frames(ENCODER, DIGEST, [7], features(1))
    assert await redis_client.ttl(redis_store.keys.frame(ENCODER, DIGEST, 7)) == -1


@pytest.mark.parametrize(
    "damage",
    [
        lambda blob: blob[: len(blob) // 2],
        lambda blob: blob[:-100] + bytes([blob[-100] ^ 0x10]) + blob[-99:],
        lambda blob: b"not a safetensors blob",
        lambda blob: b"",
    ],
    ids=["truncated", "bit-flip", "garbage", "empty"],
)
async def test_corrupt_blob_is_deleted_counted_and_missed(
    redis_store: RedisFeatureStore, redis_client: aioredis.Redis, damage
) -> None:
    x = features(3)
    await redis_store.put_frames(ENCODER, DIGEST, [0, 1, 2], x)
    key = redis_store.keys.frame(ENCODER, DIGEST, 1)
    await redis_client.set(key, damage(await redis_client.get(key)))
    got = await redis_store.get_frames(ENCODER, DIGEST, [0, 1, 2])
    assert got[1] is None
    assert torch.equal(got[0], x[0]) and torch.equal(got[2], x[2])
    assert not await redis_client.exists(key)
    stats = redis_store.stats()
    assert (stats.corrupt, stats.hits, stats.misses) == (1, 2, 1)
    assert await redis_store.get_video(manifest_for(DIGEST, [0, 1, 2])) is None


async def test_corrupt_frame_makes_get_video_miss(
    redis_store: RedisFeatureStore, redis_client: aioredis.Redis
) -> None:
    await redis_store.put_frames(ENCODER, DIGEST, [0, 1, 2], features(3))
    key = redis_store.keys.frame(ENCODER, DIGEST, 2)
    await redis_client.set(key, b"\x00" * 64)
    assert await redis_store.get_video(manifest_for(DIGEST, [0, 1, 2])) is None
    assert not await redis_client.exists(key)
    assert redis_store.stats().corrupt == 1


async def test_manifest_round_trip_and_corruption(
    redis_store: RedisFeatureStore, redis_client: aioredis.Redis
) -> None:
    manifest = manifest_for(DIGEST, [0, 30, 60])
    sid = manifest.sampling_id
    assert await redis_store.get_manifest(ENCODER, DIGEST, sid) is None
    await redis_store.put_manifest(manifest, sid)
    assert await redis_store.get_manifest(ENCODER, DIGEST, sid) == manifest
    with pytest.raises(ValueError):
        await redis_store.put_manifest(manifest, "0" * 16)
    key = redis_store.keys.manifest(ENCODER, DIGEST, sid)
    await redis_client.set(key, b'{"schema": 1, "video_digest": 3}')
    assert await redis_store.get_manifest(ENCODER, DIGEST, sid) is None
    assert not await redis_client.exists(key)
    assert redis_store.stats().corrupt == 1


async def test_get_video_rejects_frames_of_another_shape(redis_store: RedisFeatureStore) -> None:
    await redis_store.put_frames(ENCODER, DIGEST, [0, 1], features(2, tokens=9))
    assert await redis_store.get_video(manifest_for(DIGEST, [0, 1])) is None  # manifest says 17 tokens


async def test_delete_video(
    redis_store: RedisFeatureStore, redis_client: aioredis.Redis, namespace: str
) -> None:
    other = video_digest("kept")
    await redis_store.put_frames(ENCODER, DIGEST, list(range(12)), features(12))
    await redis_store.put_frames("encoder-b", DIGEST, [0, 1], features(2))
    await redis_store.put_manifest(manifest_for(DIGEST, [0, 1]))
    await redis_store.put_frames(ENCODER, other, [0], features(1))
    # Same digest in a sibling namespace (one with glob characters) must survive too.
    sibling = RedisFeatureStore(redis_client, namespace=f"{namespace}:[x]*")
    await sibling.put_frames(ENCODER, DIGEST, [0], features(1))

    assert await redis_store.delete_video(DIGEST) == 15
    assert await redis_store.get_frames(ENCODER, DIGEST, [0, 11]) == [None, None]
    assert (await redis_store.get_frames(ENCODER, other, [0]))[0] is not None
    assert (await sibling.get_frames(ENCODER, DIGEST, [0]))[0] is not None
    assert await sibling.delete_video(DIGEST) == 1
    assert await redis_store.delete_video(DIGEST) == 0


async def test_chunk_boundaries_600_frames(redis_client: aioredis.Redis, namespace: str) -> None:
    store = RedisFeatureStore(redis_client, namespace=namespace, chunk_size=256)
    x = features(600, tokens=2, dim=8)
    indices = list(range(0, 1200, 2))
    await store.put_frames(ENCODER, DIGEST, indices, x)
    manifest = manifest_for(DIGEST, indices, tokens=2, dim=8)
    assert torch.equal(await store.get_video(manifest), x)
    # Misses placed around the 256 and 512 boundaries land at the right positions.
    holes = {255, 256, 511, 512, 599}
    await redis_client.unlink(*(store.keys.frame(ENCODER, DIGEST, indices[t]) for t in holes))
    got = await store.get_frames(ENCODER, DIGEST, indices)
    assert {t for t, f in enumerate(got) if f is None} == holes
    assert all(torch.equal(got[t], x[t]) for t in range(600) if t not in holes)
    assert await store.get_video(manifest) is None


async def test_int8_store(redis_client: aioredis.Redis, namespace: str) -> None:
    fp16 = RedisFeatureStore(redis_client, namespace=namespace)
    int8 = RedisFeatureStore(redis_client, namespace=f"{namespace}:int8", fmt="int8")
    x = features(4)
    await fp16.put_frames(ENCODER, DIGEST, range(4), x)
    await int8.put_frames(ENCODER, DIGEST, range(4), x)
    video = await int8.get_video(manifest_for(DIGEST, [0, 1, 2, 3]))
    assert video.dtype == torch.float16
    assert float((video.float() - x.float()).norm() / x.float().norm()) < 0.01
    assert int8.stats().bytes_written < 0.6 * fp16.stats().bytes_written


async def test_rejects_text_clients_and_bad_settings() -> None:
    text = aioredis.Redis(decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisFeatureStore(text)
    binary = aioredis.Redis()
    for kwargs in ({"ttl_seconds": 0}, {"chunk_size": 0}, {"fmt": "bf16"}):
        with pytest.raises(ValueError):
            RedisFeatureStore(binary, **kwargs)
    await text.aclose()
    await binary.aclose()


async def test_unreachable_redis() -> None:
    store = RedisFeatureStore.from_url("redis://127.0.0.1:1/0")  # nothing listens on port 1
    assert await store.ping() is False
    with pytest.raises(CacheUnavailableError):
        await store.get_frames(ENCODER, DIGEST, [0])
    with pytest.raises(CacheUnavailableError):
        await store.put_frames(ENCODER, DIGEST, [0], features(1))
    with pytest.raises(CacheUnavailableError):
        await store.delete_video(DIGEST)
    await store.close()


async def test_ping_and_close_keep_a_borrowed_client(redis_store: RedisFeatureStore) -> None:
    assert await redis_store.ping() is True
    await redis_store.close()
    assert await redis_store.client.ping()  # the fixture's client is still usable


async def test_cancelled_read_leaves_consistent_state(redis_client: aioredis.Redis, namespace: str) -> None:
    store = RedisFeatureStore(redis_client, namespace=namespace, chunk_size=4)
    x = features(200, tokens=8, dim=64)
    manifest = manifest_for(DIGEST, list(range(200)), tokens=8, dim=64)
    await store.put_frames(ENCODER, DIGEST, manifest.frame_indices, x)
    task = asyncio.ensure_future(store.get_video(manifest))
    await asyncio.sleep(0.002)  # somewhere in the middle of the 50 round trips
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    stats = store.stats()
    assert stats.queries == stats.hits + stats.misses and stats.misses == 0
    assert torch.equal(await store.get_video(manifest), x)
