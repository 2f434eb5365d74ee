"""Frame blobs read over several connections at once, each received straight into its tensor.

Why: one redis-py connection decoding in Python reached ~0.25x of what ``redis-benchmark`` pulls
from the same server, the time going to parser copies and to a single stream. Here the keys are
split into one contiguous slice per connection; each slice is fetched by its own thread with
pipelined GETs (``window`` keys per write, the next window sent before the current one is read,
so the server never waits for the client) and every value is received by :mod:`cache.wire`
directly into the output tensor (``out[i]`` of a preallocated [T, N, C] video, or a fresh frame).
The checksum is then verified on that memory; nothing else touches the bytes.

Threads only count into their own :class:`SliceReport`; the caller (the event loop) sums them, so
the store's counters need no lock. Corrupt blobs are reported by key for the caller to delete.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from cache.errors import CorruptEntryError
from cache.serialize import finish, header_length, landing_buffer, output_for, parse_header
from cache.wire import WireConnection, WireEndpoint, WirePool, WireReplyError

# The position's output tensor (a view into a preallocated video) or None for a fresh one.
OutputFor = Callable[[int], torch.Tensor | None]


@dataclass
class SliceReport:
    """What one connection's slice of keys came to."""

    replies: int = 0
    hits: int = 0
    nils: int = 0
    bytes_read: int = 0
    corrupt: list[str] = field(default_factory=list)
    mismatch: str | None = None  # a ValueError: the blob has another shape than the output


def _no_output(_: int) -> None:
    return None


def receive_blob(connection: WireConnection, size: int, out: torch.Tensor | None) -> torch.Tensor:
    """Receive one bulk value of ``size`` bytes as features, into ``out`` where given.

    Raises :class:`CorruptEntryError` or ``ValueError`` (shape mismatch) only after the whole
    value has been consumed, so the connection stays in sync for the next reply.
    """
    remaining = size
    try:
        prefix = connection.read_exact(min(8, size))
        remaining -= len(prefix)
        header_len = header_length(prefix, size)
        raw = connection.read_exact(header_len)
        remaining -= header_len
        header = parse_header(raw, size)
        destination = output_for(header, out)
        data = landing_buffer(header, destination)
        connection.read_into(data)
        remaining -= header.data_len
    except (CorruptEntryError, ValueError):
        connection.skip(remaining)
        connection.expect_crlf()
        raise
    connection.expect_crlf()
    return finish(header, data, destination)


@dataclass
class SliceJob:
    """One connection's share of a read: ``keys`` are those of ``positions`` in the caller's list."""

    keys: Sequence[str]
    positions: Sequence[int]
    output_for: OutputFor
    results: list[torch.Tensor | None]
    stop: threading.Event
    stop_on_miss: bool
    window: int

    def detach(self) -> None:
        """Drop the references to the caller's tensors before the thread reports back.

        Why: the executor still holds the job for a moment after the result is delivered; were the
        output tensor reachable from it, the caller's next read could find its buffer "in use"
        (see :class:`cache.buffers.BufferRecycler`) and fault in a new one.
        """
        self.output_for = _no_output
        self.results = []


def _take_reply(connection: WireConnection, job: SliceJob, index: int, report: SliceReport) -> None:
    """Read the reply for ``job.keys[index]`` and record its outcome."""
    try:
        size = connection.read_bulk_length()
    except WireReplyError as error:
        if not str(error).startswith("WRONGTYPE"):  # MGET reads another type's key as nil; so do we
            raise
        size = None
    report.replies += 1
    if size is None:
        report.nils += 1
        if job.stop_on_miss:
            job.stop.set()
        return
    report.bytes_read += size
    position = job.positions[index]
    try:
        job.results[position] = receive_blob(connection, size, job.output_for(position))
        report.hits += 1
    except CorruptEntryError:
        report.corrupt.append(job.keys[index])
        if job.stop_on_miss:
            job.stop.set()
    except ValueError as error:
        report.mismatch = str(error)
        job.stop.set()


def _read_slice_on(connection: WireConnection, job: SliceJob, report: SliceReport) -> None:
    """Pipelined GETs of the slice, one window in flight ahead of the one being read."""
    windows = [range(s, min(s + job.window, len(job.keys))) for s in range(0, len(job.keys), job.window)]
    if not windows or job.stop.is_set():
        return
    connection.send_gets([job.keys[i] for i in windows[0]])
    for number, window in enumerate(windows):
        ahead = number + 1 < len(windows) and not job.stop.is_set()
        if ahead:
            connection.send_gets([job.keys[i] for i in windows[number + 1]])
        for index in window:
            _take_reply(connection, job, index, report)
        if not ahead:
            return


def read_slice(pool: WirePool, job: SliceJob) -> SliceReport:
    """Fetch one slice on a pooled connection (blocking; run it in a thread).

    Every reply sent for is read before the connection goes back to the pool; a connection that
    failed midway is closed instead, so no reply is ever read by the wrong request. A pooled
    connection that fails before its first reply (the server closed it while idle: a restart, its
    ``timeout`` setting) is replaced by a new one once, as redis-py's pool does.
    """
    try:
        while True:
            report = SliceReport()
            connection = pool.acquire()
            try:
                _read_slice_on(connection, job, report)
            except OSError:
                pool.discard(connection)
                if connection.reused and report.replies == 0:
                    continue  # the retry uses a new connection (or another idle one), never this one
                raise
            except BaseException:
                pool.discard(connection)
                raise
            pool.release(connection)
            return report
    finally:
        job.detach()


def split(count: int, connections: int, window: int) -> list[range]:
    """Contiguous ranges of positions, one per connection used: at most ``connections``, and no
    more than there are windows' worth of keys (a few frames are not worth several round trips)."""
    used = max(1, min(connections, -(-count // window)))
    bounds = [count * i // used for i in range(used + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(used) if bounds[i] < bounds[i + 1]]


Outcome = SliceReport | BaseException


class ParallelReader:
    """The sockets and threads of parallel reads for one store, created on first use.

    :meth:`start` hands each slice to a thread of its own; the caller awaits the outcomes (one
    :class:`SliceReport`, or the exception that ended the slice, per thread). :meth:`close` closes
    the idle sockets and the threads; the next :meth:`start` opens new ones.
    """

    def __init__(self, endpoint: WireEndpoint, connections: int, window: int) -> None:
        self.endpoint = endpoint
        self.connections = connections
        self.window = window
        self._pool: WirePool | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def open_connections(self) -> int:
        """Sockets open right now, idle or in use."""
        return self._pool.open_connections if self._pool is not None else 0

    def start(
        self, keys: Sequence[str], output_for: OutputFor, *, stop_on_miss: bool
    ) -> tuple[list[torch.Tensor | None], threading.Event, asyncio.Future[list[Outcome]]]:
        """Start fetching ``keys``: the results list the threads fill, the event that stops them
        at their next window, and the future of their outcomes (exceptions returned, not raised)."""
        if self._pool is None or self._executor is None:
            self._pool = WirePool(self.endpoint)
            self._executor = ThreadPoolExecutor(self.connections, thread_name_prefix="cache-read")
        loop = asyncio.get_running_loop()
        results: list[torch.Tensor | None] = [None] * len(keys)
        stop = threading.Event()
        futures = [
            loop.run_in_executor(
                self._executor,
                read_slice,
                self._pool,
                SliceJob(keys[r.start : r.stop], r, output_for, results, stop, stop_on_miss, self.window),
            )
            for r in split(len(keys), self.connections, self.window)
        ]
        return results, stop, asyncio.gather(*futures, return_exceptions=True)

    def close(self) -> None:
        """Close idle sockets (busy ones close when their thread ends) and stop the threads."""
        pool, executor, self._pool, self._executor = self._pool, self._executor, None, None
        if pool is not None:
            pool.close()
        if executor is not None:
            executor.shutdown(wait=False)
