"""A loopback HTTP server (127.0.0.1) that counts requests and answers with chosen cache headers,
honouring ``If-None-Match`` / ``If-Modified-Since`` with a 304."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Resource:
    body: bytes
    headers: dict[str, str]
    etag: str | None = None
    last_modified: str | None = None
    content_type: str = "image/png"


@dataclass
class CacheHost:
    url: str
    resources: dict[str, Resource] = field(default_factory=dict)
    log: list[tuple[str, int, dict[str, str]]] = field(default_factory=list)  # path, status, conditional headers

    def downloads(self, path: str) -> int:
        return sum(1 for p, status, _ in self.log if p == path and status == 200)

    def requests(self, path: str) -> list[tuple[int, dict[str, str]]]:
        return [(status, sent) for p, status, sent in self.log if p == path]


@contextmanager
def cache_host() -> Iterator[CacheHost]:
    state = CacheHost("")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            resource = state.resources.get(self.path)
            sent = {k: self.headers[k] for k in ("If-None-Match", "If-Modified-Since") if self.headers[k]}
            if resource is None:
                state.log.append((self.path, 404, sent))
                return self.send_error(404)
            matches = (resource.etag is not None and sent.get("If-None-Match") == resource.etag) or (
                "If-None-Match" not in sent and resource.last_modified is not None
                and sent.get("If-Modified-Since") == resource.last_modified)
            status = 304 if matches else 200
            state.log.append((self.path, status, sent))
            self.send_response(status)
            for name, value in resource.headers.items():
                self.send_header(name, value)
            if resource.etag:
                self.send_header("ETag", resource.etag)
            if resource.last_modified:
                self.send_header("Last-Modified", resource.last_modified)
            self.send_header("Content-Type", resource.content_type)
            self.send_header("Content-Length", "0" if status == 304 else str(len(resource.body)))
            self.end_headers()
            if status == 200:
                self.wfile.write(resource.body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
