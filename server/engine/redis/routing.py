"""Which worker a job goes to: the one that holds, or is extracting, its video's features.

A worker's hot tier keeps the features of the videos it touched; reading an hour of them back from
Redis moves 2.6 GB. So jobs about a video go to its *owner*, chosen by rendezvous (highest random
weight) hashing of the video digest over the live workers: every API process picks the same owner
from the same set of workers with no shared state, and when a worker joins or leaves only the
videos it owned (1/M of them) change hands. Video extractions are routed the same way, so the
worker that extracted a video answers its questions from memory.

The owner's stream is bounded: when it already holds ``limit`` jobs (waiting or running), the job
goes to the shared stream, where any worker with room takes it, and pays one cold read there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Literal

# Why a job went where it went (``llamavid_route_total{reason}``, ``server.metrics.ROUTE_REASONS``).
RouteReason = Literal["affine", "owner_busy", "owner_gone", "no_media", "shared"]


def weight(digest: str, worker: str) -> int:
    """A stable pseudo-random weight of (video, worker); blake2b for speed and uniformity, not secrecy."""
    return int.from_bytes(hashlib.blake2b(f"{digest}\0{worker}".encode(), digest_size=8).digest(), "big")


def owner(digest: str, workers: Iterable[str]) -> str | None:
    """The worker with the highest weight for ``digest`` (ties, vanishingly rare, by id)."""
    return max(workers, key=lambda worker: (weight(digest, worker), worker), default=None)
