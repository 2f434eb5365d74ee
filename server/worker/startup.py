"""What a worker settles before it loads a model: its GPU and its metrics port.

* ``pin_device``: ``--device cuda:N`` makes GPU N the only one the process sees
  (``CUDA_VISIBLE_DEVICES``), so every CUDA call on every thread (the model thread, Triton kernels,
  ``empty_cache``) lands on it, not only the tensors placed explicitly: ``llamavid worker --device
  cuda:3`` is the per-GPU unit. Imports no torch; it must run before CUDA is initialised.
* ``serve_metrics``: ``/metrics``, ``/health`` and ``/ready`` on the configured port, 0 (the
  default) being a free port chosen by the system, so any number of workers start side by side on
  one host; a taken explicit port is a one-line error, not a traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from threading import Thread
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from ..metrics import LlamaVidMetrics
from ..settings import Settings

log = logging.getLogger(__name__)

_CUDA_INDEX = re.compile(r"cuda:(\d+)")


class StartupError(Exception):
    """A worker that cannot start, with the one line that says why (the process exits with ``code``)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def pin_device(settings: Settings, environ: dict[str, str] | None = None) -> Settings:
    """``cuda:N`` -> only GPU N visible (index N of an existing ``CUDA_VISIBLE_DEVICES`` list, e.g. a
    container's), and the settings' device becomes ``cuda:0``, the only device left. Other devices
    pass through unchanged."""
    env = os.environ if environ is None else environ
    match = _CUDA_INDEX.fullmatch(settings.device or "")
    if match is None:
        return settings
    index = int(match.group(1))
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        listed = [part.strip() for part in visible.split(",") if part.strip()]
        if index >= len(listed):
            raise StartupError(f"--device cuda:{index}: CUDA_VISIBLE_DEVICES={visible} makes only {len(listed)} "
                               f"GPU(s) visible (cuda:0..cuda:{len(listed) - 1})")
        gpu = listed[index]
    else:
        gpu = str(index)
    env["CUDA_VISIBLE_DEVICES"] = gpu
    log.info("worker pinned to GPU %s (CUDA_VISIBLE_DEVICES=%s, cuda:0 in this process)", gpu, gpu)
    return settings.model_copy(update={"device": "cuda:0"})


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the stdlib's name)
        pass


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


@dataclass
class MetricsEndpoint:
    """The worker's small HTTP server: ``/metrics``, ``/health`` (the process answers) and ``/ready``
    (200 once the model is warm and the worker consumes jobs; 503 before and while it stops), the
    readiness probe of an orchestrator."""

    port: int
    url: str  # where Prometheus finds it, as advertised in the worker's card
    server: WSGIServer
    ready: bool = False

    def card_fields(self) -> dict[str, object]:
        return {"metrics_port": self.port, "metrics_url": self.url}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(metrics: LlamaVidMetrics, settings: Settings) -> MetricsEndpoint:
    host, wanted = settings.worker_metrics_host, settings.worker_metrics_port
    exporter = make_wsgi_app(metrics.registry)
    endpoint: MetricsEndpoint

    def app(environ: dict, start_response: Callable) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/health", "/ready"):
            ok = path == "/health" or endpoint.ready
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"not ready\n"]
        return exporter(environ, start_response)

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("_Server", (_Server,), {"address_family": family})
    try:
        server = make_server(host, wanted, app, server_class, handler_class=_QuietHandler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"the worker metrics port {host}:{wanted} is already in use: set "
                               "LLAMAVID_WORKER_METRICS_PORT (--worker-metrics-port) to a free port, or to 0 "
                               "for one chosen by the system") from None
        raise StartupError(f"cannot serve worker metrics on {host}:{wanted}: {exc}") from None
    Thread(target=server.serve_forever, name="llamavid-metrics", daemon=True).start()
    port = server.server_address[1]
    advertised = host if host not in ("0.0.0.0", "::", "") else socket.gethostname()
    endpoint = MetricsEndpoint(port, f"http://{advertised}:{port}/metrics", server)
    log.info("worker metrics on %s:%d (%s; /ready once consuming)", host, port, endpoint.url)
    return endpoint
