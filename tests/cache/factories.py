"""Small builders shared by the cache tests: digests, tiny features, manifests."""

from __future__ import annotations

import torch

from cache.keys import digest_bytes
from cache.manifest import Manifest

ENCODER = "eva-vit-g/test-weights@224/float16"


def video_digest(label: str) -> str:
    """A valid, distinct video digest per label."""
    return digest_bytes(label.encode())


def features(frames: int, tokens: int = 17, dim: int = 176, *, seed: int = 0) -> torch.Tensor:
    """Tiny random [T, N, C] float16 features, distinct per frame."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(frames, tokens, dim, generator=generator).to(torch.float16)


def manifest_for(
    digest: str, indices: list[int], *, tokens: int = 17, dim: int = 176, fps: float = 1.0
) -> Manifest:
    """A manifest of ``indices`` sampled from a 30 fps source."""
    return Manifest(
        video_digest=digest,
        encoder_id=ENCODER,
        sampling={"fps": fps, "max_frames": 256, "start": 0, "end": None},
        frame_indices=indices,
        timestamps=[i / 30.0 for i in indices],
        source_fps=30.0,
        num_source_frames=max(indices) + 1,
        duration=(max(indices) + 1) / 30.0,
        feature_shape=[tokens, dim],
        dtype="float16",
    )
