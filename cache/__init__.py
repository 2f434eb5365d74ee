"""Content-addressed cache of per-frame vision features (see ``cache.store`` for the interface).

Knows nothing of models or HTTP: it stores and fetches [1+P, C] feature tensors keyed by
(encoder id, video digest, source frame index), plus one manifest per sampling of a video.

``RedisFeatureStore`` is imported lazily so that ``import cache`` works on installs without the
``redis`` package (it ships with the ``server`` extra), e.g. for in-process use by the model side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cache.errors import CacheError, CacheUnavailableError, CorruptEntryError
from cache.keys import (
    DEFAULT_NAMESPACE,
    SCHEMA_VERSION,
    FeatureKeys,
    digest_bytes,
    digest_file,
    digest_stream,
    sampling_id,
)
from cache.manifest import Manifest
from cache.memory import MemoryFeatureStore
from cache.serialize import FORMATS, Format, decode, encode
from cache.store import CacheStats, FeatureStore
from cache.tiered import TieredFeatureStore

if TYPE_CHECKING:
    from cache.redis import RedisFeatureStore

__all__ = [
    "DEFAULT_NAMESPACE",
    "FORMATS",
    "SCHEMA_VERSION",
    "CacheError",
    "CacheStats",
    "CacheUnavailableError",
    "CorruptEntryError",
    "FeatureKeys",
    "FeatureStore",
    "Format",
    "Manifest",
    "MemoryFeatureStore",
    "RedisFeatureStore",
    "TieredFeatureStore",
    "decode",
    "digest_bytes",
    "digest_file",
    "digest_stream",
    "encode",
    "sampling_id",
]


def __getattr__(name: str) -> object:
    if name == "RedisFeatureStore":
        from cache.redis import RedisFeatureStore

        return RedisFeatureStore
    raise AttributeError(f"module 'cache' has no attribute {name!r}")
