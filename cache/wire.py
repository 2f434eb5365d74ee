"""A minimal blocking Redis connection that receives large GET replies straight into caller buffers.

Why not redis-py: with either of its parsers a 0.7 MB value is copied three or four times in user
space (socket buffer -> parser buffer -> ``bytes`` -> the caller's tensor), which on a small host
costs more than Redis takes to send it. Here the RESP framing (``$<len>\\r\\n``) is read through a
small buffer and the value itself goes from the kernel into the caller's memory with
``socket.recv_into``: the only user-space copy left is the one the kernel makes. Blocking sockets
release the GIL while they wait and copy, so a few connections on a few threads read in parallel.

Only what feature reads need is spoken: the handshake (AUTH, SELECT), pipelined GETs, and their
replies (bulk strings, RESP2/RESP3 nils, errors). :meth:`WireEndpoint.from_client` says ``None``
for clients this cannot mimic (TLS, Sentinel, credential providers); callers then use redis-py.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.connection import BlockingConnectionPool, ConnectionPool, UnixDomainSocketConnection

_SMALL_READ = 4096  # what one buffered read asks for: framing and blob headers, never a whole value
_DEFAULT_TIMEOUT = 30.0  # seconds, when the client sets none: a dead server must not hang a thread


class WireProtocolError(OSError):
    """The server sent something that is not the reply expected; the connection is unusable."""


class WireReplyError(Exception):
    """The server answered one command with an error reply (the connection stays in sync)."""


@dataclass(frozen=True)
class WireEndpoint:
    """Where and how to connect: taken from a redis-py client so both talk to the same server."""

    host: str | None = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a Unix socket instead of TCP
    db: int = 0
    username: str | None = None
    password: str | None = None
    client_name: str | None = None  # set on our sockets too, so CLIENT LIST shows whose they are
    timeout: float | None = _DEFAULT_TIMEOUT
    connect_timeout: float | None = _DEFAULT_TIMEOUT

    @classmethod
    def from_client(cls, client: aioredis.Redis) -> WireEndpoint | None:
        """The client's server and credentials, or ``None`` where it connects in a way not mimicked."""
        pool = client.connection_pool
        if type(pool) not in (ConnectionPool, BlockingConnectionPool):
            return None
        kwargs = pool.connection_kwargs
        if kwargs.get("credential_provider") is not None or kwargs.get("redis_connect_func") is not None:
            return None
        timeout = kwargs.get("socket_timeout") or _DEFAULT_TIMEOUT
        connect_timeout = kwargs.get("socket_connect_timeout") or timeout
        common = {
            "db": int(kwargs.get("db") or 0),
            "username": kwargs.get("username"),
            "password": kwargs.get("password"),
            "client_name": kwargs.get("client_name"),
            "timeout": float(timeout),
            "connect_timeout": float(connect_timeout),
        }
        if pool.connection_class is UnixDomainSocketConnection:
            return cls(host=None, path=kwargs["path"], **common)
        if pool.connection_class is aioredis.Connection:
            return cls(host=kwargs.get("host", "127.0.0.1"), port=int(kwargs.get("port", 6379)), **common)
        return None  # TLS or a custom connection class


def _kernel_timeouts(sock: socket.socket, timeout: float | None) -> None:
    """Make ``sock`` blocking with the timeout enforced by the kernel (SO_RCVTIMEO/SO_SNDTIMEO).

    Why: a Python-level timeout makes the socket non-blocking, and then ``MSG_WAITALL`` returns
    whatever has arrived; blocking, one ``recv_into`` fills a whole 0.7 MB value in one system
    call instead of dozens, each of which also takes and drops the GIL.
    """
    if timeout is not None:
        seconds = int(timeout)
        timeval = struct.pack("ll", seconds, int((timeout - seconds) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    sock.settimeout(None)


def pack_command(*args: bytes | str | int) -> bytes:
    """One command in RESP (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class WireConnection:
    """One blocking connection; not thread-safe (a pool hands each to one thread at a time)."""

    def __init__(self, endpoint: WireEndpoint) -> None:
        self.reused = False  # set by the pool once it hands the connection out a second time
        self._buffer = bytearray(_SMALL_READ)
        self._start = self._end = 0  # unread bytes are _buffer[_start:_end]
        self.sock = self._connect(endpoint)
        try:
            self._handshake(endpoint)
        except BaseException:
            self.sock.close()
            raise

    @staticmethod
    def _connect(endpoint: WireEndpoint) -> socket.socket:
        if endpoint.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(endpoint.connect_timeout)
            try:
                sock.connect(endpoint.path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((endpoint.host, endpoint.port), timeout=endpoint.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _kernel_timeouts(sock, endpoint.timeout)
        return sock

    def _handshake(self, endpoint: WireEndpoint) -> None:
        commands = []
        if endpoint.password is not None:
            user = [endpoint.username] if endpoint.username else []
            commands.append(pack_command("AUTH", *user, endpoint.password))
        if endpoint.db:
            commands.append(pack_command("SELECT", endpoint.db))
        if endpoint.client_name:
            commands.append(pack_command("CLIENT", "SETNAME", endpoint.client_name))
        if not commands:
            return
        self.send(b"".join(commands))
        for _ in commands:
            line = self.read_line()
            if not line.startswith(b"+"):
                raise WireProtocolError(f"handshake failed: {line[:200]!r}")

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran (a closed socket has no file descriptor)."""
        return self.sock.fileno() < 0

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Write a batch of packed commands."""
        self.sock.sendall(data)

    def send_gets(self, keys: Sequence[str]) -> None:
        """Pipeline one GET per key in a single write."""
        self.send(b"".join(pack_command("GET", key) for key in keys))

    def _fill(self) -> None:
        """Read more into the small buffer (compacting it first); EOF is an error."""
        if self._start:
            pending = self._end - self._start
            self._buffer[:pending] = self._buffer[self._start : self._end]
            self._start, self._end = 0, pending
        if self._end == len(self._buffer):
            self._buffer.extend(bytes(len(self._buffer)))  # a line longer than the buffer: grow
        received = self.sock.recv_into(memoryview(self._buffer)[self._end :])
        if received == 0:
            raise WireProtocolError("connection closed by the server")
        self._end += received

    def read_line(self) -> bytes:
        """One CRLF-terminated line, without the CRLF."""
        while True:
            found = self._buffer.find(b"\r\n", self._start, self._end)
            if found >= 0:
                line = bytes(self._buffer[self._start : found])
                self._start = found + 2
                return line
            self._fill()

    def read_exact(self, size: int) -> bytes:
        """``size`` bytes as a new object: for small things such as blob headers."""
        target = bytearray(size)
        self.read_into(memoryview(target))
        return bytes(target)

    def read_into(self, target: memoryview) -> None:
        """Fill ``target`` completely: buffered bytes first, then straight from the socket."""
        target = target.cast("B") if target.format != "B" or target.ndim != 1 else target
        have = min(self._end - self._start, len(target))
        target[:have] = self._buffer[self._start : self._start + have]
        self._start += have
        filled = have
        while filled < len(target):
            if len(target) - filled < _SMALL_READ:  # a short tail: one buffered read is cheaper
                self._fill()
                have = min(self._end - self._start, len(target) - filled)
                target[filled : filled + have] = self._buffer[self._start : self._start + have]
                self._start += have
                filled += have
                continue
            received = self.sock.recv_into(target[filled:], 0, socket.MSG_WAITALL)
            if received == 0:
                raise WireProtocolError("connection closed by the server")
            filled += received

    def skip(self, size: int) -> None:
        """Consume and drop ``size`` bytes (the rest of a value nobody wants)."""
        scratch = memoryview(bytearray(min(size, 1 << 20)))
        while size > 0:
            step = min(size, len(scratch))
            self.read_into(scratch[:step])
            size -= step

    def expect_crlf(self) -> None:
        """The CRLF that ends a bulk string."""
        if self.read_line() != b"":
            raise WireProtocolError("bulk string not followed by CRLF")

    def read_bulk_length(self) -> int | None:
        """Start reading a GET reply: the value's length, or ``None`` for a nil.

        An error reply raises :class:`WireReplyError` (already consumed, so the connection stays
        usable); anything else raises :class:`WireProtocolError`.
        """
        line = self.read_line()
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else size
        if kind == b"_":  # RESP3 null
            return None
        if kind == b"-":
            raise WireReplyError(rest.decode(errors="replace"))
        raise WireProtocolError(f"unexpected reply to GET: {line[:200]!r}")


class WirePool:
    """Idle :class:`WireConnection` s for one endpoint, reused across reads and closed by :meth:`close`.

    A connection that failed mid-reply is discarded, never returned. ``open_connections`` counts
    those created and not yet closed, so tests can show nothing leaks.
    """

    def __init__(self, endpoint: WireEndpoint) -> None:
        self.endpoint = endpoint
        self._idle: list[WireConnection] = []
        self._lock = threading.Lock()
        self._open = 0
        self._closed = False

    @property
    def open_connections(self) -> int:
        """Connections created by this pool and not closed yet (idle or in use)."""
        with self._lock:
            return self._open

    def acquire(self) -> WireConnection:
        """An idle connection, or a new one."""
        with self._lock:
            if self._idle:
                connection = self._idle.pop()
                connection.reused = True
                return connection
        connection = WireConnection(self.endpoint)
        with self._lock:
            self._open += 1
        return connection

    def release(self, connection: WireConnection) -> None:
        """Give back a connection whose replies were all read (closed if the pool was closed)."""
        with self._lock:
            if not self._closed:
                self._idle.append(connection)
                return
        self.discard(connection)

    def discard(self, connection: WireConnection) -> None:
        """Close a connection that may be out of sync with the server."""
        connection.close()
        with self._lock:
            self._open -= 1

    def close(self) -> None:
        """Close every idle connection; ones in use are closed when their thread gives them back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
        for connection in idle:
            connection.close()
