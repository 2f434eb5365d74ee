"""Content-addressed cache of per-frame vision features (see ``cache.store`` for the interface).

Knows nothing of models or HTTP: it stores and fetches [1+P, C] feature tensors keyed by
(encoder id, video digest, source frame index), plus one manifest per sampling of a video.

Names are imported lazily: ``cache.keys``, ``cache.manifest`` and ``cache.purge`` need no torch,
and the HTTP front end (which must not load torch) uses them through ``import cache.keys``,
which runs this file; the tensor stores load torch only when one of them is asked for.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "CacheError": "errors", "CacheUnavailableError": "errors", "CorruptEntryError": "errors",
    "DEFAULT_NAMESPACE": "keys", "SCHEMA_VERSION": "keys", "FeatureKeys": "keys", "digest_bytes": "keys",
    "digest_file": "keys", "digest_stream": "keys", "sampling_id": "keys",
    "Manifest": "manifest",
    "MemoryFeatureStore": "memory",
    "RedisFeatureStore": "redis",
    "FORMATS": "serialize", "Format": "serialize", "decode": "serialize", "encode": "serialize",
    "CacheStats": "store", "FeatureStore": "store",
    "TieredFeatureStore": "tiered",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'cache' has no attribute {name!r}")
    return getattr(importlib.import_module(f"cache.{home}"), name)
