"""In-process LRU: eviction order, the byte bound, dtype policy and thread safety."""

from __future__ import annotations

import threading

import pytest
import torch

from cache.memory import MemoryFeatureStore
from cache.store import FeatureStore
from tests.cache.factories import ENCODER, features, manifest_for, video_digest

DIGEST = video_digest("memory")
FRAME_BYTES = 17 * 176 * 2  # one tiny fp16 frame


def test_implements_the_protocol() -> None:
    assert isinstance(MemoryFeatureStore(0), FeatureStore)


async def test_round_trip_and_partial_hits() -> None:
    store = MemoryFeatureStore(100 * FRAME_BYTES)
    x = features(4)
    await store.put_frames(ENCODER, DIGEST, [0, 30, 60, 90], x)
    got = await store.get_frames(ENCODER, DIGEST, [30, 45, 90])
    assert torch.equal(got[0], x[1]) and got[1] is None and torch.equal(got[2], x[3])
    assert await store.get_frames("other-encoder", DIGEST, [30]) == [None]
    stats = store.stats()
    assert (stats.queries, stats.hits, stats.misses) == (4, 2, 2)
    assert stats.entries == 4 and stats.bytes_stored == 4 * FRAME_BYTES
    assert stats.bytes_read == 2 * FRAME_BYTES and stats.bytes_written == 4 * FRAME_BYTES


async def test_stores_private_float16_copies() -> None:
    store = MemoryFeatureStore(100 * FRAME_BYTES)
    x = features(2).float()
    await store.put_frames(ENCODER, DIGEST, [0, 1], x)
    x.zero_()  # the caller reusing its buffer must not change the cache
    (frame,) = await store.get_frames(ENCODER, DIGEST, [1])
    assert frame.dtype == torch.float16 and torch.equal(frame, features(2)[1])
    assert store.stats().bytes_stored == 2 * FRAME_BYTES  # fp16 size, not the fp32 input's


async def test_lru_evicts_least_recently_used_first() -> None:
    store = MemoryFeatureStore(3 * FRAME_BYTES)
    x = features(4)
    await store.put_frames(ENCODER, DIGEST, [0, 1, 2], x[:3])
    await store.get_frames(ENCODER, DIGEST, [0])  # 0 is now the most recent; 1 is the oldest
    await store.put_frames(ENCODER, DIGEST, [3], x[3:])
    present = [f is not None for f in await store.get_frames(ENCODER, DIGEST, [0, 1, 2, 3])]
    assert present == [True, False, True, True]
    stats = store.stats()
    assert stats.evictions == 1 and stats.bytes_stored == 3 * FRAME_BYTES


async def test_byte_bound_is_never_exceeded() -> None:
    limit = 10 * FRAME_BYTES + FRAME_BYTES // 2
    store = MemoryFeatureStore(limit)
    for start in range(0, 100, 7):
        await store.put_frames(ENCODER, DIGEST, list(range(start, start + 7)), features(7, seed=start))
        assert store.stats().bytes_stored <= limit
    stats = store.stats()
    assert stats.entries == 10 and stats.evictions == 105 - 10
    # The survivors are the 10 most recently written frames.
    got = await store.get_frames(ENCODER, DIGEST, list(range(95, 105)))
    assert all(f is not None for f in got)


async def test_oversized_entry_is_not_stored_and_evicts_nothing() -> None:
    store = MemoryFeatureStore(2 * FRAME_BYTES)
    await store.put_frames(ENCODER, DIGEST, [0], features(1))
    await store.put_frames(ENCODER, DIGEST, [1], features(1, tokens=40))  # > 2 frames' worth
    assert await store.get_frames(ENCODER, DIGEST, [1]) == [None]
    assert (await store.get_frames(ENCODER, DIGEST, [0]))[0] is not None
    assert store.stats().evictions == 0


async def test_overwrite_replaces_size() -> None:
    store = MemoryFeatureStore(100 * FRAME_BYTES)
    await store.put_frames(ENCODER, DIGEST, [0], features(1))
    await store.put_frames(ENCODER, DIGEST, [0], features(1, tokens=5, seed=3))
    stats = store.stats()
    assert stats.entries == 1 and stats.bytes_stored == 5 * 176 * 2


async def test_get_video_and_manifest() -> None:
    store = MemoryFeatureStore(100 * FRAME_BYTES)
    manifest = manifest_for(DIGEST, [0, 30, 60])
    assert await store.get_video(manifest) is None
    x = features(3)
    await store.put_frames(ENCODER, DIGEST, manifest.frame_indices[:2], x[:2])
    assert await store.get_video(manifest) is None  # incomplete
    await store.put_frames(ENCODER, DIGEST, [60], x[2:])
    assert torch.equal(await store.get_video(manifest), x)
    await store.put_manifest(manifest)
    assert await store.get_manifest(ENCODER, DIGEST, manifest.sampling_id) == manifest
    with pytest.raises(ValueError):
        await store.put_manifest(manifest, "0" * 16)


async def test_delete_video_only_touches_that_video() -> None:
    store = MemoryFeatureStore(100 * FRAME_BYTES)
    other = video_digest("other")
    await store.put_frames(ENCODER, DIGEST, [0, 1], features(2))
    await store.put_frames("encoder-b", DIGEST, [0], features(1))
    await store.put_manifest(manifest_for(DIGEST, [0, 1]))
    await store.put_frames(ENCODER, other, [0], features(1))
    assert await store.delete_video(DIGEST) == 4
    assert store.stats().entries == 1
    assert store.stats().bytes_stored == FRAME_BYTES
    assert (await store.get_frames(ENCODER, other, [0]))[0] is not None


async def test_rejects_mismatched_features() -> None:
    store = MemoryFeatureStore(100 * FRAME_BYTES)
    with pytest.raises(ValueError):
        await store.put_frames(ENCODER, DIGEST, [0, 1, 2], features(2))
    with pytest.raises(ValueError):
        await store.get_frames(ENCODER, "nope", [0])


def test_threads_keep_the_table_consistent() -> None:
    limit = 40 * FRAME_BYTES
    store = MemoryFeatureStore(limit)
    x = features(8)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(worker: int) -> None:
        try:
            start.wait()
            digest = video_digest(f"thread-{worker % 3}")
            for step in range(200):
                indices = [(worker * 7 + step + i) % 64 for i in range(4)]
                if step % 2:
                    store.put_frames_sync(ENCODER, digest, indices, x[:4])
                else:
                    for frame in store.get_frames_sync(ENCODER, digest, indices):
                        assert frame is None or frame.shape == (17, 176)
                assert store.stats().bytes_stored <= limit
        except BaseException as error:  # noqa: BLE001 - reported to the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    stats = store.stats()
    assert stats.entries == len(store._entries) and stats.entries <= 40
    assert stats.bytes_stored == sum(size for _, size in store._entries.values())
    assert stats.queries == stats.hits + stats.misses == 8 * 100 * 4
