"""Redis backend: one safetensors blob per frame (see :mod:`cache.serialize`), one JSON manifest
per sampling, shared by every API and worker process and surviving their restarts.

Reads go out as chunked ``MGET`` s (``chunk_size`` keys per round trip) and are decoded straight
into the output tensor with vectorised copies, in a worker thread that overlaps the next round
trip; writes go out as non-transactional pipelines of ``SET ... EX``, encoded the same way. The
default chunk of 32 keys (~23 MB of 257x1408 fp16 frames) was measured fastest with redis-py's
pure-Python parser on localhost: replies of hundreds of MB are slower, because the client buffers
and re-copies a whole reply before returning it.

Deployment: give Redis a ``maxmemory`` and ``maxmemory-policy allkeys-lru``. Every key here is
recomputable, so letting Redis evict the least recently used frames is the intended way to bound
memory; ``ttl_seconds`` is an optional upper bound on age on top of that. With the default
``noeviction`` policy a full Redis makes writes fail instead. A video whose frames were partly
evicted simply reads as incomplete (:meth:`RedisFeatureStore.get_video` returns ``None``).

Failures talking to Redis raise :class:`CacheUnavailableError` (the tiered store absorbs them).
Blobs that fail verification are deleted, counted and read as misses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import redis.asyncio as aioredis
import torch
from redis.exceptions import RedisError

from cache.errors import CacheUnavailableError, CorruptEntryError
from cache.keys import DEFAULT_NAMESPACE, FeatureKeys
from cache.manifest import Manifest
from cache.purge import delete_video_keys
from cache.serialize import FORMATS, Format, decode, encode
from cache.store import CacheStats, check_features, check_manifest_sampling_id

logger = logging.getLogger(__name__)

_Consume = Callable[[int, bytes], None]


_COUNTERS = ("queries", "hits", "misses", "corrupt", "bytes_read", "bytes_written")


@contextlib.contextmanager
def _unavailable_on_error(action: str) -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError) as error:
        raise CacheUnavailableError(f"Redis {action} failed: {error!r}") from error


class RedisFeatureStore:
    """Feature store on a ``redis.asyncio.Redis`` client (implements ``FeatureStore``).

    The client must return bytes (``decode_responses=False``). It stays the caller's unless
    ``owns_client`` is set (as :meth:`from_url` does), in which case :meth:`close` closes it.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        ttl_seconds: int | None = None,
        fmt: Format = "float16",
        chunk_size: int = 32,
        owns_client: bool = False,
    ) -> None:
        if client.get_encoder().decode_responses:
            raise ValueError("the Redis client must use decode_responses=False: entries are binary")
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive or None, got {ttl_seconds}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.client = client
        self.keys = FeatureKeys(namespace)
        self.ttl_seconds = ttl_seconds
        self.fmt: Format = fmt
        self.chunk_size = chunk_size
        self._owns_client = owns_client
        self._counts = dict.fromkeys(_COUNTERS, 0)

    @classmethod
    def from_url(cls, url: str, **kwargs: object) -> RedisFeatureStore:
        """A store with its own client for ``url`` (closed by :meth:`close`)."""
        client = aioredis.Redis.from_url(url, decode_responses=False)
        return cls(client, owns_client=True, **kwargs)  # type: ignore[arg-type]

    def _decode_chunk(
        self, start: int, chunk: list[str], blobs: list[bytes | None], consume: _Consume
    ) -> list[str]:
        """Hand each blob of one MGET reply to ``consume``; return the keys whose blob was corrupt."""
        corrupt = []
        for offset, blob in enumerate(blobs):
            if blob is None:
                continue
            try:
                consume(start + offset, blob)
            except CorruptEntryError as error:
                logger.warning("deleting corrupt cache entry %s: %s", chunk[offset], error)
                corrupt.append(chunk[offset])
        return corrupt

    async def _settle(self, decoding: asyncio.Future[list[str]], present: int) -> bool:
        """Wait for one chunk's decoding, count it and delete its corrupt keys; True if all were sound."""
        corrupt = await asyncio.shield(decoding)  # a cancelled caller still waits for the thread
        self._counts["hits"] += present - len(corrupt)
        self._counts["misses"] += len(corrupt)
        self._counts["corrupt"] += len(corrupt)
        if corrupt:
            # A valid blob rewritten between our MGET and this UNLINK is lost too: a rare recompute.
            with _unavailable_on_error("UNLINK"):
                await self.client.unlink(*corrupt)
        return not corrupt

    async def _read(
        self, keys: list[str], consume: _Consume, *, stop_on_miss: bool, in_thread: bool = True
    ) -> bool:
        """MGET ``keys`` chunk by chunk and hand each blob to ``consume(position, blob)``.

        With ``in_thread`` each chunk is decoded in a worker thread while the next chunk is read:
        the checksum and the copies release the GIL, so decoding overlaps the network and the event
        loop is never blocked for a whole chunk. Returns whether every key was found and sound.
        Corrupt blobs are deleted and count as misses. With ``stop_on_miss``, reading stops after
        the chunk where the first miss shows up.
        """
        loop = asyncio.get_running_loop()
        complete = True
        pending: tuple[asyncio.Future[list[str]], int] | None = None
        try:
            for start in range(0, len(keys), self.chunk_size):
                chunk = keys[start : start + self.chunk_size]
                with _unavailable_on_error("MGET"):
                    blobs = await self.client.mget(chunk)
                if pending is not None:
                    complete &= await self._settle(*pending)
                    pending = None
                present = [blob for blob in blobs if blob is not None]
                self._counts["queries"] += len(blobs)
                self._counts["misses"] += len(blobs) - len(present)
                self._counts["bytes_read"] += sum(map(len, present))
                complete &= len(present) == len(blobs)
                if in_thread:
                    job = asyncio.to_thread(self._decode_chunk, start, chunk, blobs, consume)
                    decoding = asyncio.ensure_future(job)
                else:
                    decoding = loop.create_future()
                    decoding.set_result(self._decode_chunk(start, chunk, blobs, consume))
                pending = (decoding, len(present))
                if stop_on_miss and not complete:
                    break
        finally:
            # Also after an error or a cancellation: let the thread decoding the last chunk finish
            # (and its corrupt keys be deleted) before the caller's tensor is handed back or dropped.
            if pending is not None:
                complete &= await self._settle(*pending)
        return complete

    async def get_frames(
        self, encoder_id: str, video_digest: str, indices: Sequence[int]
    ) -> list[torch.Tensor | None]:
        """CPU float16 features per index, ``None`` for misses (and for deleted corrupt entries)."""
        keys = self.keys.frames(encoder_id, video_digest, indices)
        results: list[torch.Tensor | None] = [None] * len(keys)

        def consume(position: int, blob: bytes) -> None:
            results[position] = decode(blob)

        await self._read(keys, consume, stop_on_miss=False)
        return results

    async def get_video(self, manifest: Manifest) -> torch.Tensor | None:
        """The [T, N, C] CPU float16 video, decoded in place; ``None`` at the first missing frame.

        A frame whose shape differs from ``manifest.feature_shape`` (an entry from some other
        computation) also yields ``None``.
        """
        keys = self.keys.frames(manifest.encoder_id, manifest.video_digest, manifest.frame_indices)
        video = torch.empty([len(keys), *manifest.feature_shape], dtype=torch.float16)

        def consume(position: int, blob: bytes) -> None:
            decode(blob, out=video[position])

        try:
            complete = await self._read(keys, consume, stop_on_miss=True)
        except ValueError as error:  # shape mismatch; CorruptEntryError is handled inside _read
            logger.warning("cached frames of %s do not match its manifest: %s", manifest.video_digest, error)
            return None
        return video if complete else None

    async def put_frames(
        self, encoder_id: str, video_digest: str, indices: Sequence[int], features: torch.Tensor
    ) -> None:
        """SET one blob per frame, ``chunk_size`` frames per pipeline round trip.

        Chunks are encoded in a worker thread, the next one while the current one is sent.
        """
        check_features(indices, features)
        keys = self.keys.frames(encoder_id, video_digest, indices)
        features = features.detach()
        size = self.chunk_size

        def encode_chunk(start: int) -> list[bytes]:
            return [encode(features[t], self.fmt) for t in range(start, min(start + size, len(keys)))]

        def start_encoding(start: int) -> asyncio.Future[list[bytes]] | None:
            return (
                asyncio.ensure_future(asyncio.to_thread(encode_chunk, start)) if start < len(keys) else None
            )

        encoding = start_encoding(0)
        try:
            for start in range(0, len(keys), size):
                assert encoding is not None
                blobs = await encoding
                encoding = start_encoding(start + size)
                pipe = self.client.pipeline(transaction=False)
                for key, blob in zip(keys[start : start + size], blobs, strict=True):
                    pipe.set(key, blob, ex=self.ttl_seconds)
                with _unavailable_on_error("SET pipeline"):
                    await pipe.execute()
                self._counts["bytes_written"] += sum(map(len, blobs))
        finally:
            if encoding is not None:  # an error cut the loop short: let the thread finish
                with contextlib.suppress(Exception):
                    await encoding

    async def get_manifest(self, encoder_id: str, video_digest: str, sampling_id: str) -> Manifest | None:
        """The stored manifest; a malformed one is deleted and read as a miss."""
        key = self.keys.manifest(encoder_id, video_digest, sampling_id)
        found: list[Manifest] = []
        await self._read(
            [key], lambda _, blob: found.append(Manifest.from_json(blob)), stop_on_miss=False, in_thread=False
        )
        return found[0] if found else None

    async def put_manifest(self, manifest: Manifest, sampling_id: str | None = None) -> None:
        """SET the manifest's JSON under its sampling id."""
        sid = check_manifest_sampling_id(manifest, sampling_id)
        data = manifest.to_json().encode()
        key = self.keys.manifest(manifest.encoder_id, manifest.video_digest, sid)
        with _unavailable_on_error("SET"):
            await self.client.set(key, data, ex=self.ttl_seconds)
        self._counts["bytes_written"] += len(data)

    async def delete_video(self, video_digest: str) -> int:
        """SCAN for every key of the video under the namespace and UNLINK them in batches."""
        with _unavailable_on_error("SCAN/UNLINK"):
            return await delete_video_keys(self.client, self.keys.namespace, video_digest)

    async def ping(self) -> bool:
        """Whether Redis answers PING."""
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError):
            return False

    def stats(self) -> CacheStats:
        """Counters of this process's traffic; Redis-side size and evictions are not tracked."""
        return CacheStats(**self._counts)

    async def close(self) -> None:
        """Close the client if this store created it."""
        if self._owns_client:
            await self.client.aclose()
