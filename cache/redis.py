"""Redis backend: one safetensors blob per frame (see :mod:`cache.serialize`), one JSON manifest
per sampling, shared by every API and worker process and surviving their restarts.

Frame reads (``get_frames``, ``get_video``) go over ``connections`` plain sockets of our own
(:mod:`cache.wire`, :mod:`cache.parallel`): each fetches a contiguous slice of the frames with
pipelined GETs on its own thread and receives every value straight into the output tensor, so a
read runs near what the server can send (see the README's benchmark). Where the client connects in
a way those sockets do not mimic (TLS, Sentinel, credential providers), or with ``connections=0``,
reads go out as chunked ``MGET`` s on the redis-py client (``chunk_size`` keys per round trip),
decoded in a worker thread that overlaps the next round trip. Manifests always take that path.
Writes go out as non-transactional pipelines of ``SET ... EX``, ``chunk_size`` frames each.

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

from cache.buffers import BufferRecycler
from cache.errors import CacheUnavailableError, CorruptEntryError
from cache.keys import DEFAULT_NAMESPACE, FeatureKeys
from cache.manifest import Manifest
from cache.parallel import Outcome, OutputFor, ParallelReader, SliceReport
from cache.purge import delete_video_keys
from cache.serialize import FORMATS, Format, decode, encode
from cache.store import CacheStats, check_features, check_manifest_sampling_id
from cache.wire import WireEndpoint, WireReplyError

logger = logging.getLogger(__name__)

_Consume = Callable[[int, bytes], None]


_COUNTERS = ("queries", "hits", "misses", "corrupt", "bytes_read", "bytes_written")


@contextlib.contextmanager
def _unavailable_on_error(action: str) -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError, WireReplyError) as error:
        raise CacheUnavailableError(f"Redis {action} failed: {error!r}") from error


class RedisFeatureStore:
    """Feature store on a ``redis.asyncio.Redis`` client (implements ``FeatureStore``).

    The client must return bytes (``decode_responses=False``). It stays the caller's unless
    ``owns_client`` is set (as :meth:`from_url` does), in which case :meth:`close` closes it.
    Frame reads use up to ``connections`` sockets of the store's own to the client's server
    (opened on first use, kept for reuse, closed by :meth:`close`), ``window`` GETs per write.
    :meth:`get_video` receives into buffers of up to ``reuse_bytes`` in all that are reused once
    the caller has dropped the tensors it got (see :class:`cache.buffers.BufferRecycler`); 0
    allocates every video afresh.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        ttl_seconds: int | None = None,
        fmt: Format = "float16",
        chunk_size: int = 32,
        connections: int = 4,
        window: int = 4,
        reuse_bytes: int = 4 << 30,
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
        if connections < 0 or window < 1 or reuse_bytes < 0:
            raise ValueError(
                f"need connections >= 0, window >= 1, reuse_bytes >= 0; got {connections}, {window}, {reuse_bytes}"
            )
        self.client = client
        self.keys = FeatureKeys(namespace)
        self.ttl_seconds = ttl_seconds
        self.fmt: Format = fmt
        self.chunk_size = chunk_size
        self.connections = connections
        self.window = window
        self._owns_client = owns_client
        self._counts = dict.fromkeys(_COUNTERS, 0)
        endpoint = WireEndpoint.from_client(client) if connections else None
        self._reader = ParallelReader(endpoint, connections, window) if endpoint is not None else None
        self._buffers = BufferRecycler(reuse_bytes)

    @property
    def parallel_reads(self) -> bool:
        """Whether frame reads take the parallel socket path (else chunked MGETs on the client)."""
        return self._reader is not None

    @property
    def open_connections(self) -> int:
        """Sockets of the parallel path open right now (the redis-py client's are not counted)."""
        return self._reader.open_connections if self._reader is not None else 0

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

    async def _tally(self, outcomes: list[Outcome], expected: int) -> tuple[bool, str | None]:
        """Count the slices' outcomes, delete corrupt keys, raise the first failure.

        Returns whether all ``expected`` keys were read and sound, and a shape-mismatch message.
        """
        reports = [o for o in outcomes if isinstance(o, SliceReport)]
        corrupt = [key for report in reports for key in report.corrupt]
        for report in reports:
            self._counts["queries"] += report.replies
            self._counts["hits"] += report.hits
            self._counts["misses"] += report.nils + len(report.corrupt)
            self._counts["bytes_read"] += report.bytes_read
        self._counts["corrupt"] += len(corrupt)
        for key in corrupt:
            logger.warning("deleting corrupt cache entry %s", key)
        if corrupt:
            with _unavailable_on_error("UNLINK"):
                await self.client.unlink(*corrupt)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            with _unavailable_on_error("GET"):
                raise failures[0]
        mismatch = next((r.mismatch for r in reports if r.mismatch), None)
        sound = sum(r.hits for r in reports) == expected
        return sound and mismatch is None, mismatch

    async def _read_parallel(
        self, keys: list[str], output_for: OutputFor, *, stop_on_miss: bool
    ) -> tuple[list[torch.Tensor | None], bool, str | None]:
        """GET ``keys`` over the socket pool, one slice per connection, each on its own thread.

        Returns the tensors (``None`` for misses), whether all were found and sound, and a
        shape-mismatch message if some blob did not fit its output. A cancelled caller still waits
        for the threads (they write into tensors the caller owns), which stop at their next window.
        """
        assert self._reader is not None
        results, stop, gathered = self._reader.start(keys, output_for, stop_on_miss=stop_on_miss)
        try:
            outcomes = await asyncio.shield(gathered)
        except asyncio.CancelledError:
            stop.set()
            with contextlib.suppress(CacheUnavailableError):  # the cancellation is what the caller sees
                await self._tally(await gathered, len(keys))
            raise
        complete, mismatch = await self._tally(outcomes, len(keys))
        return results, complete, mismatch

    async def get_frames(
        self, encoder_id: str, video_digest: str, indices: Sequence[int]
    ) -> list[torch.Tensor | None]:
        """CPU float16 features per index, ``None`` for misses (and for deleted corrupt entries)."""
        keys = self.keys.frames(encoder_id, video_digest, indices)
        if self.parallel_reads and keys:
            frames, _, _ = await self._read_parallel(keys, lambda _: None, stop_on_miss=False)
            return frames
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
        video = self._buffers.empty([len(keys), *manifest.feature_shape])
        if self.parallel_reads and keys:
            _, complete, mismatch = await self._read_parallel(
                keys, lambda position: video[position], stop_on_miss=True
            )
            if mismatch is not None:
                logger.warning("cached frames of %s do not match its manifest: %s", manifest.video_digest, mismatch)
                return None
            return video if complete else None

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
    ) -> int:
        """SET one blob per frame (NX: a stored frame is kept, and counted), ``chunk_size`` frames
        per pipeline round trip. Chunks are encoded in a worker thread, the next one while the
        current one is sent.
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
        stored = 0
        try:
            for start in range(0, len(keys), size):
                assert encoding is not None
                blobs = await encoding
                encoding = start_encoding(start + size)
                pipe = self.client.pipeline(transaction=False)
                for key, blob in zip(keys[start : start + size], blobs, strict=True):
                    pipe.set(key, blob, ex=self.ttl_seconds, nx=True)
                with _unavailable_on_error("SET pipeline"):
                    written = await pipe.execute()
                stored += sum(not ok for ok in written)
                self._counts["bytes_written"] += sum(len(blob) for blob, ok in zip(blobs, written) if ok)
        finally:
            if encoding is not None:  # an error cut the loop short: let the thread finish
                with contextlib.suppress(Exception):
                    await encoding
        return stored

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
        """Close the parallel path's sockets and threads, and the client if this store created it."""
        if self._reader is not None:
            self._reader.close()
        self._buffers.clear()
        if self._owns_client:
            await self.client.aclose()
