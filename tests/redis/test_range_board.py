"""The range board of a shared extraction, on Redis and in memory (the same contract): each range
goes to one holder, a live holder keeps it however slow it is, a dead holder's range is resumed
by another, and a deleted board stays deleted. Also the record's progress, which only moves forward."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from server.engine.jobs import Sampling, VideoRecord
from server.engine.redis.storage import RedisRangeBoard, RedisVideoRegistry
from server.engine.storage import MemoryRangeBoard, MemoryVideoRegistry, RangeBoard, RangeClaim

LEASE = 1.0  # seconds; renewed every LEASE / 3 by a live holder (margin for a loaded CI machine)


@pytest.fixture(params=["redis", "memory"])
def board(request, redis_client: aioredis.Redis, namespace: str) -> RangeBoard:
    if request.param == "memory":
        return MemoryRangeBoard()
    return RedisRangeBoard(redis_client, namespace, ttl=600)


async def test_each_range_goes_to_one_holder_and_the_board_keeps_its_size(board: RangeBoard) -> None:
    assert await board.claim("b", "a", LEASE) is None  # no board yet: a late helper takes nothing
    assert await board.create("b", 3, 50) == 50
    assert await board.create("b", 9, 10) == 50  # a second owner (a takeover) keeps the board
    claims = [await board.claim("b", holder, LEASE) for holder in ("a", "b", "a")]
    assert claims == [RangeClaim(0, 50, False), RangeClaim(2, 50, False), RangeClaim(1, 50, False)]
    assert await board.claim("b", "c", LEASE) is None  # all held, none expired
    await board.finish("b", 1, skipped=[57, 58])
    assert await board.add_frames("b", 48) == 48 and await board.add_frames("b", 2) == 50
    state = await board.state("b")
    assert (state.count, state.done, state.frames, state.skipped, state.complete) == (3, 1, 50, [57, 58], False)


async def test_each_holder_reads_on_through_its_own_half(board: RangeBoard) -> None:
    """Two holders taking turns: each continues after its last range (its decoder never seeks
    back or far), the second starting in the middle of what the first had not taken."""
    await board.create("b", 10, 12)
    last: dict[str, int | None] = {"a": None, "b": None}
    taken: dict[str, list[int]] = {"a": [], "b": []}
    for holder in "abababababab":
        claim = await board.claim("b", holder, LEASE, after=last[holder])
        if claim is not None:
            taken[holder].append(claim.index)
            last[holder] = claim.index
    assert taken == {"a": [0, 1, 2, 3, 4], "b": [5, 6, 7, 8, 9]}


async def test_a_slow_live_holder_keeps_its_range_and_a_dead_ones_is_resumed(board: RangeBoard) -> None:
    await board.create("b", 2, 10)
    assert await board.claim("b", "slow", LEASE) == RangeClaim(0, 10, False)
    assert await board.claim("b", "dead", LEASE) == RangeClaim(1, 10, False)

    async def renew_for(seconds: float) -> None:  # "slow" renews on its own schedule; "dead" does not
        for _ in range(int(seconds / (LEASE / 3))):
            assert await board.renew("b", "slow", 0, LEASE)
            await asyncio.sleep(LEASE / 3)

    await renew_for(3 * LEASE)  # three leases long: range 0 stays with "slow", range 1 expired
    assert await board.claim("b", "other", LEASE) == RangeClaim(1, 10, True)
    assert await board.claim("b", "other", LEASE) is None
    assert not await board.renew("b", "dead", 1, LEASE)  # came back: its range is gone, it must leave it
    await board.finish("b", 0, [])
    await board.finish("b", 1, [3])
    state = await board.state("b")
    assert state.complete and state.skipped == [3]


async def test_a_deleted_board_stays_deleted(board: RangeBoard) -> None:
    await board.create("b", 1, 10)
    assert await board.claim("b", "a", LEASE) == RangeClaim(0, 10, False)
    await board.delete("b")
    await board.finish("b", 0, [])  # a holder that finishes after the owner wrote the manifest
    assert await board.add_frames("b", 5) == 0
    assert (await board.state("b")).count == 0 and await board.claim("b", "a", LEASE) is None


@pytest.mark.parametrize("kind", ["redis", "memory"])
async def test_progress_from_several_workers_only_moves_forward(kind: str, redis_client: aioredis.Redis,
                                                               namespace: str) -> None:
    registry = RedisVideoRegistry(redis_client, namespace, 600) if kind == "redis" else MemoryVideoRegistry()
    await registry.put(VideoRecord(id="v", digest="d" * 64, sampling=Sampling(), status="extracting"))
    seen = []
    for done in (10, 30, 20, 30, 31):  # reports of two workers, arriving out of order
        await registry.advance("v", done)
        seen.append((await registry.get("v")).frames_done)
    assert seen == [10, 30, 30, 30, 31]
    await registry.advance("v", 5)
    assert (await registry.get("v")).frames_done == 31
    await registry.update("v", status="ready", frames_done=40)
    await registry.advance("v", 50)  # a straggler after the video is ready changes nothing
    assert (await registry.get("v")).frames_done == 40
