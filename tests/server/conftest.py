"""Live-server fixtures: real ``llamavid serve`` subprocesses on free ports, test videos, and a
loopback media host.

Two servers are shared by the whole session and started in parallel (startup costs seconds):

* ``server``: default settings except ``max_frames`` high enough that a long video at a high
  fps cannot fit the tiny model's 2048-token context;
* ``strict_server``: API keys, one running + one waiting question, and small byte limits.

The media host serves files on 127.0.0.1 (allow-listed by ``start_server``) and redirects to a
trap listener on 127.0.0.2, which is loopback but not allow-listed: it counts connections, so a
test can prove the server never connected there.
"""

from __future__ import annotations

import os
import shutil
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.server.live import wait_ready_video
from tests.serving import Process, free_port, spawn, wait_ready
from tests.videos import frame_level, write_video

API_KEYS = ("test-key-1", "test-key-2")
STRICT_MAX_VIDEO_BYTES = 200_000
STRICT_MAX_IMAGE_BYTES = 100_000
MAIN_MAX_FRAMES = 1100  # 1100 frames x 2 tokens > 2048: the context check is reachable


# -- videos ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Videos:
    folder: Path
    short: Path  # 3 s at 10 fps: 3 frames at the default 1 fps
    many: Path  # 140 s at 8 fps: 1120 frames at fps=8, more than the context holds

    def fresh(self, name: str, seconds: float = 4.0, fps: float = 10.0,
              size: tuple[int, int] = (64, 96)) -> Path:
        """A video whose bytes no other test uses (so nothing about it is cached yet): grey ramps
        offset by a value derived from ``name``."""
        path = self.folder / name
        if not path.exists():
            n, offset = round(seconds * fps), zlib.crc32(name.encode()) % 97
            levels = [(frame_level(i, n) + offset) % 256 for i in range(n)]
            frames = np.repeat(np.array(levels, np.uint8)[:, None, None, None], 3, axis=3)
            write_video(path, fps=fps, frames=np.broadcast_to(frames, (n, *size, 3)))
        return path

    def noisy(self, name: str, frames: int = 100) -> Path:
        """Random pixels compress badly: a few hundred KB for a few seconds of 64x96."""
        path = self.folder / name
        if not path.exists():
            pixels = np.random.default_rng(7).integers(0, 256, (frames, 64, 96, 3), dtype=np.uint8)
            write_video(path, fps=10, frames=pixels)
        return path


@pytest.fixture(scope="session")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Videos:
    folder = tmp_path_factory.mktemp("videos")
    return Videos(
        folder,
        short=write_video(folder / "short.mp4", seconds=3, fps=10),
        many=write_video(folder / "many.mp4", seconds=140, fps=8),
    )


# -- a loopback media host -------------------------------------------------------------------------
class _Trap(HTTPServer):
    """Counts every connection; answers 404. Nothing should ever reach it."""

    connections = 0

    def verify_request(self, request, client_address) -> bool:
        type(self).connections += 1
        return True


class _TrapHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_error(404)

    def log_message(self, *args) -> None:
        pass


@dataclass
class MediaHost:
    url: str  # http://127.0.0.1:PORT
    folder: Path
    trap_url: str  # http://127.0.0.2:PORT
    trap: type[_Trap]
    requests: list[str]

    def media(self, path: Path) -> str:
        """The URL of ``path`` (copied into the served folder if it lives elsewhere)."""
        if path.parent != self.folder:
            shutil.copyfile(path, self.folder / path.name)
        return f"{self.url}/media/{path.name}"


@pytest.fixture(scope="session")
def media_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MediaHost]:
    folder = tmp_path_factory.mktemp("served")
    requests: list[str] = []
    trap = type("Trap", (_Trap,), {"connections": 0})
    trap_server = trap(("127.0.0.2", 0), _TrapHandler)
    trap_url = f"http://127.0.0.2:{trap_server.server_address[1]}"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            requests.append(self.path)
            kind, _, name = self.path.lstrip("/").partition("/")
            if kind == "redirect-private":
                return self._redirect(f"{trap_url}/media/{name}")
            if kind == "redirect":
                return self._redirect(f"/media/{name}")
            path = folder / name
            if kind not in ("media", "chunked") or not path.is_file():
                return self.send_error(404)
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            try:  # a fetcher over its size limit hangs up mid-body: expected, not a host error
                if kind == "media":
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_header("Transfer-Encoding", "chunked")  # no declared size: the limit bites mid-stream
                self.end_headers()
                for i in range(0, len(data), 16384):
                    piece = data[i : i + 16384]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    host = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    host.daemon_threads = True
    for s in (host, trap_server):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        yield MediaHost(f"http://127.0.0.1:{host.server_address[1]}", folder, trap_url, trap, requests)
    finally:
        host.shutdown()
        trap_server.shutdown()
        host.server_close()
        trap_server.server_close()


# -- servers ---------------------------------------------------------------------------------------
def _spawn(tmp: Path, model_dir: Path, **settings: object) -> Process:
    """``tests.serving.start_server`` without the wait, so several servers start at once."""
    env = {"LLAMAVID_MODEL": str(model_dir), "LLAMAVID_DEVICE": "cpu",
           "LLAMAVID_ALLOWED_MEDIA_HOSTS": "127.0.0.1", "LLAMAVID_MEDIA_DIR": str(tmp / "media")}
    env.update({f"LLAMAVID_{k.upper()}": str(v) for k, v in settings.items()})
    return spawn("serve", env, tmp / "serve.log", free_port())


@pytest.fixture(scope="session")
def _servers(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[dict[str, Process]]:
    processes = {
        "main": _spawn(tmp_path_factory.mktemp("main"), tiny_checkpoint, max_frames=MAIN_MAX_FRAMES),
        "strict": _spawn(tmp_path_factory.mktemp("strict"), tiny_checkpoint, api_keys=",".join(API_KEYS),
                         queue_size=1, max_running=1, max_video_bytes=STRICT_MAX_VIDEO_BYTES,
                         max_image_bytes=STRICT_MAX_IMAGE_BYTES),
    }
    try:
        for process in processes.values():
            wait_ready(process, timeout=180)
        yield processes
    finally:
        for process in processes.values():
            process.stop()
    for name, process in processes.items():  # whatever ran against them, nothing may have blown up
        log = process.output()
        assert "Traceback" not in log, f"the {name} server logged a traceback:\n{log[-4000:]}"


@pytest.fixture(scope="session")
def server(_servers: dict[str, Process]) -> Process:
    return _servers["main"]


@pytest.fixture(scope="session")
def strict_server(_servers: dict[str, Process]) -> Process:
    return _servers["strict"]


@pytest.fixture
def http(server: Process) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture
def strict_http(strict_server: Process) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEYS[0]}"}
    with httpx.Client(base_url=strict_server.url, timeout=60, headers=headers) as client:
        yield client


@pytest.fixture
def openai_client(server: Process):
    from openai import OpenAI

    with OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def short_video_id(server: Process, videos: Videos) -> str:
    """The short video, uploaded once and extracted (3 frames at 1 fps)."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        with open(videos.short, "rb") as f:
            response = client.post("/v1/videos", files={"file": ("short.mp4", f, "video/mp4")})
        assert response.status_code == 202, response.text
        video_id = response.json()["id"]
        wait_ready_video(client, video_id)
    return video_id



SNAPSHOTS = Path(__file__).parent / "snapshots"


@pytest.fixture
def snapshot() -> Callable[[str, str], None]:
    """Compare text with ``snapshots/<name>``; ``LLAMAVID_UPDATE_SNAPSHOTS=1`` rewrites the file."""
    def check(name: str, text: str) -> None:
        path = SNAPSHOTS / name
        if os.environ.get("LLAMAVID_UPDATE_SNAPSHOTS") == "1":
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
        assert path.is_file(), f"no snapshot {path}; run with LLAMAVID_UPDATE_SNAPSHOTS=1 to record it"
        assert text == path.read_text(), f"{name} differs from its snapshot:\n{text}"
    return check
