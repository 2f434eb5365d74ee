"""Exceptions raised by the feature cache.

They live in their own module so that every backend, the serialiser and the manifest can raise the
same types without importing each other.
"""

from __future__ import annotations


class CacheError(Exception):
    """Base class for every error the cache package raises on purpose."""


class CorruptEntryError(CacheError):
    """A stored entry cannot be trusted: truncated, bit-flipped, garbage, or from another schema.

    Backends catch this, delete the entry and report a miss, so a damaged blob is recomputed
    instead of being served to the model.
    """


class CacheUnavailableError(CacheError):
    """The backend could not be reached or failed (connection refused, timeout, out of memory).

    Raised instead of the client library's own errors so that callers, and the tiered store that
    absorbs cold-tier outages, need not know which backend they talk to.
    """
