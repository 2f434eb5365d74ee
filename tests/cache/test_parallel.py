"""The parallel read path (cache.wire + cache.parallel) against a real Redis.

It must return exactly what the single-connection MGET path returns, keep corruption detection and
miss accounting when frames are spread over several connections, stay in sync on every connection
after misses, damaged blobs and odd replies, and leave no socket open after ``close``.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
import torch

from cache.buffers import BufferRecycler
from cache.parallel import split
from cache.redis import RedisFeatureStore
from cache.wire import WireEndpoint
from tests.cache.conftest import REDIS_URL
from tests.cache.factories import ENCODER, features, manifest_for, video_digest

DIGEST = video_digest("parallel")
FRAMES = 37  # with 3 connections and a window of 2: slices of 12, 12 and 13, several windows each


def stores(client: aioredis.Redis, namespace: str, fmt: str = "float16") -> tuple[RedisFeatureStore, ...]:
    """(parallel, sequential) stores on the same keys."""
    parallel = RedisFeatureStore(client, namespace=namespace, fmt=fmt, connections=3, window=2)
    sequential = RedisFeatureStore(client, namespace=namespace, fmt=fmt, connections=0, chunk_size=5)
    assert parallel.parallel_reads and not sequential.parallel_reads
    return parallel, sequential


@pytest.mark.parametrize("fmt", ["float16", "int8"])
async def test_parallel_read_equals_sequential(redis_client: aioredis.Redis, namespace: str, fmt: str) -> None:
    parallel, sequential = stores(redis_client, namespace, fmt)
    x = features(FRAMES)
    indices = list(range(0, 2 * FRAMES, 2))
    await parallel.put_frames(ENCODER, DIGEST, indices, x)
    manifest = manifest_for(DIGEST, indices)
    video = await parallel.get_video(manifest)
    assert torch.equal(video, await sequential.get_video(manifest))
    if fmt == "float16":
        assert torch.equal(video, x)
    asked = indices[::-1] + [1, 3]  # reversed, plus two misses
    got, expected = [await s.get_frames(ENCODER, DIGEST, asked) for s in (parallel, sequential)]
    assert [f is None for f in got] == [f is None for f in expected] == [False] * FRAMES + [True, True]
    assert all(torch.equal(a, b) for a, b in zip(got[:FRAMES], expected[:FRAMES], strict=True))
    one, other = parallel.stats(), sequential.stats()
    assert (one.queries, one.hits, one.misses, one.bytes_read) == (
        other.queries, other.hits, other.misses, other.bytes_read
    )
    await parallel.close()
    assert parallel.open_connections == 0


async def test_corrupt_blobs_on_several_connections(redis_client: aioredis.Redis, namespace: str) -> None:
    parallel, _ = stores(redis_client, namespace)
    x = features(FRAMES)
    await parallel.put_frames(ENCODER, DIGEST, range(FRAMES), x)
    damaged = {1: lambda b: b[: len(b) // 2], 13: lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:],
               30: lambda b: b"garbage", 36: lambda b: b""}  # one in each slice, and the last frame
    for t, damage in damaged.items():
        key = parallel.keys.frame(ENCODER, DIGEST, t)
        await redis_client.set(key, damage(await redis_client.get(key)))
    got = await parallel.get_frames(ENCODER, DIGEST, list(range(FRAMES)))
    assert {t for t, f in enumerate(got) if f is None} == set(damaged)
    assert all(torch.equal(got[t], x[t]) for t in range(FRAMES) if t not in damaged)
    stats = parallel.stats()
    assert (stats.corrupt, stats.hits, stats.misses) == (4, FRAMES - 4, 4)
    for t in damaged:
        assert not await redis_client.exists(parallel.keys.frame(ENCODER, DIGEST, t))
    # Every connection skipped the damaged values whole: the next reads on them are right.
    await parallel.put_frames(ENCODER, DIGEST, sorted(damaged), x[sorted(damaged)])
    assert torch.equal(await parallel.get_video(manifest_for(DIGEST, list(range(FRAMES)))), x)
    assert parallel.open_connections <= 3
    await parallel.close()


async def test_corrupt_frame_makes_parallel_get_video_miss(redis_client: aioredis.Redis, namespace: str) -> None:
    parallel, _ = stores(redis_client, namespace)
    await parallel.put_frames(ENCODER, DIGEST, range(FRAMES), features(FRAMES))
    key = parallel.keys.frame(ENCODER, DIGEST, 20)
    blob = await redis_client.get(key)
    await redis_client.set(key, blob[:-1] + bytes([blob[-1] ^ 0x40]))  # a flipped payload bit
    assert await parallel.get_video(manifest_for(DIGEST, list(range(FRAMES)))) is None
    assert not await redis_client.exists(key) and parallel.stats().corrupt == 1
    await parallel.close()


async def test_shape_mismatch_and_wrong_type(redis_client: aioredis.Redis, namespace: str) -> None:
    parallel, sequential = stores(redis_client, namespace)
    await parallel.put_frames(ENCODER, DIGEST, range(FRAMES), features(FRAMES))
    assert await parallel.get_video(manifest_for(DIGEST, list(range(FRAMES)), tokens=5)) is None
    key = parallel.keys.frame(ENCODER, DIGEST, 4)
    await redis_client.unlink(key)
    await redis_client.hset(key, "not", "a string")  # GET answers WRONGTYPE; MGET answers nil
    got, expected = [await s.get_frames(ENCODER, DIGEST, list(range(FRAMES))) for s in (parallel, sequential)]
    assert [f is None for f in got] == [f is None for f in expected] == [t == 4 for t in range(FRAMES)]
    assert torch.equal(await parallel.get_video(manifest_for(DIGEST, [0, 1, 2, 3])), features(FRAMES)[:4])
    await parallel.close()


async def test_connections_are_reused_and_closed(redis_client: aioredis.Redis, namespace: str) -> None:
    parallel, _ = stores(redis_client, namespace)
    x = features(FRAMES)
    await parallel.put_frames(ENCODER, DIGEST, range(FRAMES), x)
    manifest = manifest_for(DIGEST, list(range(FRAMES)))
    for _ in range(5):
        assert torch.equal(await parallel.get_video(manifest), x)
        assert 1 <= parallel.open_connections <= 3  # reused: never more than one per thread
    await parallel.close()
    assert parallel.open_connections == 0
    assert torch.equal(await parallel.get_video(manifest), x)  # a closed store reconnects on use
    await parallel.close()
    assert parallel.open_connections == 0


async def test_other_database_and_unix_endpoint(redis_client: aioredis.Redis, namespace: str) -> None:
    client = aioredis.Redis.from_url(REDIS_URL.rsplit("/", 1)[0] + "/1", decode_responses=False)
    store = RedisFeatureStore(client, namespace=namespace, connections=2, window=1)
    try:
        await store.put_frames(ENCODER, DIGEST, range(4), features(4))
        assert not await redis_client.exists(store.keys.frame(ENCODER, DIGEST, 0))  # db 1 only
        assert torch.equal(await store.get_video(manifest_for(DIGEST, [0, 1, 2, 3])), features(4))
    finally:
        await store.delete_video(DIGEST)
        await store.close()
        await client.aclose()
    unix = WireEndpoint.from_client(aioredis.Redis(unix_socket_path="/tmp/redis.sock", db=3, password="pw"))
    assert unix == WireEndpoint(host=None, path="/tmp/redis.sock", db=3, password="pw",
                                timeout=unix.timeout, connect_timeout=unix.connect_timeout)
    tcp = WireEndpoint.from_client(aioredis.Redis.from_url("redis://h:7/2", socket_timeout=30, socket_connect_timeout=2))
    assert (tcp.host, tcp.port, tcp.db, tcp.timeout, tcp.connect_timeout) == ("h", 7, 2, 30.0, 2.0)
    assert WireEndpoint.from_client(aioredis.Redis.from_url("rediss://localhost:6380/0")) is None


def test_split_covers_every_position_once() -> None:
    for count in (1, 2, 7, 37, 600):
        for connections in (1, 3, 4, 8):
            ranges = split(count, connections, window=4)
            assert [t for r in ranges for t in r] == list(range(count))
            assert len(ranges) <= connections and (count > 4 or len(ranges) == 1)


def test_recycler_never_hands_out_memory_still_in_use() -> None:
    recycler = BufferRecycler(max_bytes=10_000, min_bytes=0)
    first = recycler.empty([4, 100])
    second = recycler.empty([4, 100])
    assert first.data_ptr() != second.data_ptr()  # the first is still alive
    row = first[2]
    address = first.data_ptr()
    del first
    assert recycler.empty([4, 100]).data_ptr() != address  # a view still holds it
    del row
    third = recycler.empty([2, 100])  # a smaller video fits the freed buffer
    assert third.data_ptr() == address and third.shape == (2, 100) and third.dtype == torch.float16
    assert recycler.held_bytes <= 10_000
    too_big = recycler.empty([100, 100])  # beyond max_bytes: allocated, not kept
    assert too_big.shape == (100, 100) and recycler.held_bytes <= 10_000
    third.fill_(1.0)
    recycler.clear()
    assert recycler.held_bytes == 0 and bool((third == 1).all())  # still valid after clear


async def server_side(client: aioredis.Redis, name: str) -> list[str]:
    """Addresses of the server's connections named ``name`` (ours and the redis-py client's)."""
    return [c["addr"] for c in await client.client_list() if c.get("name") == name]


async def server_side_after_close(client: aioredis.Redis, name: str, expected: int) -> list[str]:
    """The server's connections named ``name`` once it has handled the closes we sent.

    Why a loop: a socket closed by the client is freed when the server's event loop reads the
    EOF, which may come after our CLIENT LIST in the same iteration. A leaked socket never goes
    away, so the loop ends on the first agreeing answer and gives up only after many rounds.
    """
    addresses = await server_side(client, name)
    for _ in range(200):
        if len(addresses) == expected:
            break
        await asyncio.sleep(0.01)
        addresses = await server_side(client, name)
    return addresses


async def test_no_socket_leaks_and_dead_idle_sockets_are_replaced(namespace: str) -> None:
    name = f"test-parallel-{namespace.rsplit(':', 1)[-1]}"
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=False, client_name=name)
    store = RedisFeatureStore(client, namespace=namespace, connections=3, window=2)
    x = features(FRAMES)
    manifest = manifest_for(DIGEST, list(range(FRAMES)))
    try:
        await store.put_frames(ENCODER, DIGEST, range(FRAMES), x)
        baseline = len(await server_side(client, name))  # the redis-py client's own connection(s)
        for _ in range(3):
            assert torch.equal(await store.get_video(manifest), x)
        opened = store.open_connections  # 3, or fewer if a thread finished before another began
        assert 1 <= opened <= 3
        assert len(await server_side(client, name)) == baseline + opened  # the server agrees
        # The server drops every connection (a restart, an idle timeout): reads still succeed.
        for addr in await server_side(client, name):
            await client.client_kill_filter(addr=addr)  # skips the connection asking
        assert torch.equal(await store.get_video(manifest), x)
        assert 1 <= store.open_connections <= 3 and store.stats().misses == 0
        assert len(await server_side(client, name)) == baseline + store.open_connections
    finally:
        await store.delete_video(DIGEST)
        await store.close()
    assert store.open_connections == 0
    assert len(await server_side_after_close(client, name, baseline)) == baseline  # only redis-py's left
    await client.aclose()


async def test_get_video_reuses_a_dropped_output_and_never_a_live_one(
    redis_client: aioredis.Redis, namespace: str
) -> None:
    store = RedisFeatureStore(redis_client, namespace=namespace, connections=3, window=4)
    x = features(48, tokens=257, dim=1408)  # 35 MB: big enough to come from the recycler
    manifest = manifest_for(DIGEST, list(range(48)), tokens=257, dim=1408)
    await store.put_frames(ENCODER, DIGEST, range(48), x)
    first = await store.get_video(manifest)
    address = first.data_ptr()
    del first  # dropped right away: the next read lands in the same memory
    second = await store.get_video(manifest)
    assert second.data_ptr() == address and torch.equal(second, x)
    third = await store.get_video(manifest)  # `second` is alive: new memory, `second` untouched
    assert third.data_ptr() != address and torch.equal(third, x) and torch.equal(second, x)
    await store.close()
