"""Deleting a video's feature entries from Redis without touching a tensor.

Apart from ``cache.redis`` so that a process that never reads features (the HTTP front end,
which must not import torch) can still forget a video when a user deletes it.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from cache.keys import FeatureKeys

_DELETE_BATCH = 500


async def delete_video_keys(client: aioredis.Redis, namespace: str, video_digest: str) -> int:
    """SCAN for every key of the video under ``namespace`` (all encoders, all schema versions) and
    UNLINK them in batches; returns how many were deleted."""
    pattern = FeatureKeys(namespace).video_pattern(video_digest)
    deleted, batch = 0, []
    async for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= _DELETE_BATCH:
            deleted += await client.unlink(*batch)
            batch = []
    if batch:
        deleted += await client.unlink(*batch)
    return deleted
