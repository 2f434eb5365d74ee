"""Media intake: sniffing, data: URLs, uploads, and http(s) fetching against real servers
bound to loopback. Traffic goes only to 127.0.0.1 / 127.0.0.2; hostnames that must "resolve"
elsewhere go through a patched resolver and are refused before any connection."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
import ssl
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from server.fetch import fetch as fetcher
from server.fetch import netguard
from server.fetch.fetch import (
    FetchedMedia,
    MediaError,
    MediaPolicy,
    decode_data_url,
    fetch_url,
    read_upload,
    sniff_media_kind,
)

TEXT = b"hello, I am a text file that calls itself video.mp4\n" * 40


def _make_mp4() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(4):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def _make_image(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


MP4 = _make_mp4()
PNG = _make_image("PNG")


def _assert_error(info: pytest.ExceptionInfo, status: int, code: str) -> MediaError:
    err = info.value
    assert (err.status_code, err.code) == (status, code), repr(err)
    return err


# ---------------------------------------------------------------- sniffing


@pytest.mark.parametrize(
    "head, kind",
    [
        (MP4, "video"),
        (b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00qt  ", "video"),
        (b"\x00\x00\x00\x18ftyp3gp4\x00\x00\x00\x00", "video"),
        (b"\x00\x00\x00\x08moov", "video"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01", "video"),
        (b"RIFF\x00\x10\x00\x00AVI LIST", "video"),
        ((b"\x47" + b"\xff" * 187) * 3, "video"),
        ((b"\x00" * 4 + b"\x47" + b"\xff" * 187) * 3, "video"),
        (b"\x00\x00\x01\xba\x44\x00\x04\x00", "video"),
        (b"FLV\x01\x05\x00\x00\x00\x09", "video"),
        (b"OggS\x00\x02", "video"),
        (PNG, "image"),
        (_make_image("JPEG"), "image"),
        (_make_image("GIF"), "image"),
        (_make_image("WEBP"), "image"),
        (_make_image("BMP"), "image"),
        (TEXT, None),
        (b"", None),
        (b"RIFF\x00\x10\x00\x00WAVEfmt ", None),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", None),
        (b"\x47" + b"\xff" * 187, None),  # one TS sync byte is not enough
        (b"BM is also how this sentence starts", None),
        (b"<html><body>video</body></html>", None),
    ],
)
def test_sniff_media_kind(head: bytes, kind: str | None) -> None:
    assert sniff_media_kind(head[:1024]) == kind


# ---------------------------------------------------------------- data: URLs


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_data_url_base64() -> None:
    got = decode_data_url(f"data:image/png;base64,{_b64(PNG)}", 1 << 20, kind="image")
    assert got == FetchedMedia(data=PNG, content_type="image/png", final_url="data:", kind="image")
    got = decode_data_url(f"DATA:Video/MP4;name=a.mp4;BASE64,{_b64(MP4)}", 1 << 20, kind=None)
    assert (got.data, got.content_type, got.kind) == (MP4, "video/mp4", "video")


def test_data_url_percent_encoded() -> None:
    got = decode_data_url("data:," + urllib.parse.quote_from_bytes(PNG), 1 << 20, kind="image")
    assert (got.data, got.content_type, got.kind) == (PNG, None, "image")


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64,iVBO*w0KGgo=",  # '*' is not base64
        "data:image/png;base64,iVBORw0KGgo",  # bad padding
        "data:image/png;base64,iVBORw0K\nGgo=",  # whitespace
        "data:image/png;base64,iVBORw0K-_go=",  # urlsafe alphabet
    ],
)
def test_data_url_invalid_base64(url: str) -> None:
    with pytest.raises(MediaError) as info:
        decode_data_url(url, 1 << 20, kind="image")
    err = _assert_error(info, 400, "invalid_data_url")
    assert str(err) == "image_url has an invalid base64 payload"


@pytest.mark.parametrize("url", ["data:image/png;base64" + _b64(PNG), "data:", "http://x/a.png"])
def test_data_url_malformed(url: str) -> None:
    with pytest.raises(MediaError) as info:
        decode_data_url(url, 1 << 20, kind="image")
    _assert_error(info, 400, "invalid_data_url")


def test_data_url_too_large() -> None:
    with pytest.raises(MediaError) as info:
        decode_data_url(f"data:image/png;base64,{_b64(PNG)}", len(PNG) - 1, kind="image")
    _assert_error(info, 413, "media_too_large")
    with pytest.raises(MediaError) as info:
        decode_data_url("data:," + urllib.parse.quote_from_bytes(PNG), len(PNG) - 1, kind="image")
    _assert_error(info, 413, "media_too_large")


def test_data_url_size_is_checked_before_decoding() -> None:
    # Invalid base64 would be a 400 if it were decoded; the size alone refuses it first.
    with pytest.raises(MediaError) as info:
        decode_data_url("data:video/mp4;base64," + "!" * 40_000, 1000, kind="video")
    _assert_error(info, 413, "media_too_large")


def test_data_url_wrong_kind() -> None:
    with pytest.raises(MediaError) as info:
        decode_data_url(f"data:video/mp4;base64,{_b64(PNG)}", 1 << 20, kind="video")
    err = _assert_error(info, 415, "unsupported_media")
    assert str(err) == "video_url: expected a video, but the content is an image (PNG)"
    with pytest.raises(MediaError) as info:
        decode_data_url(f"data:video/mp4;base64,{_b64(TEXT)}", 1 << 20, kind="video")
    err = _assert_error(info, 415, "unsupported_media")
    assert "not a recognised video or image format (declared video/mp4)" in str(err)


# ---------------------------------------------------------------- uploads


class FakeUpload:
    """Anything with ``async read(size)``; ``data=None`` streams zeros forever."""

    def __init__(self, data: bytes | None, content_type: str | None = None, filename: str | None = None):
        self.buf = io.BytesIO(data) if data is not None else None
        self.content_type, self.filename = content_type, filename
        self.sizes: list[int] = []

    async def read(self, size: int = -1) -> bytes:
        self.sizes.append(size)
        return self.buf.read(size) if self.buf is not None else b"\x00" * size


async def test_upload_is_read_in_chunks() -> None:
    upload = FakeUpload(MP4, content_type="video/mp4; codecs=mp4v", filename="clip.mp4")
    got = await read_upload(upload, 1 << 20, kind="video", chunk_size=1024)
    assert got == FetchedMedia(data=MP4, content_type="video/mp4", final_url="upload:clip.mp4", kind="video")
    assert max(upload.sizes) == 1024 and len(upload.sizes) == len(MP4) // 1024 + 2


async def test_upload_cap_stops_reading() -> None:
    upload = FakeUpload(None)
    with pytest.raises(MediaError) as info:
        await read_upload(upload, 10_000, kind="video", chunk_size=4096)
    err = _assert_error(info, 413, "media_too_large")
    assert str(err) == "video is larger than the 10000-byte limit"
    assert sum(upload.sizes) == 10_001


async def test_upload_wrong_or_empty_content() -> None:
    with pytest.raises(MediaError) as info:
        await read_upload(FakeUpload(MP4), 1 << 20, kind="image")
    assert str(_assert_error(info, 415, "unsupported_media")) == (
        "image: expected an image, but the content is a video (MP4/QuickTime)"
    )
    with pytest.raises(MediaError) as info:
        await read_upload(FakeUpload(b""), 1 << 20, kind=None)
    assert str(_assert_error(info, 415, "unsupported_media")) == (
        "upload: expected a video or image, but the content is empty"
    )


# ---------------------------------------------------------------- http(s) against loopback servers

SLOW_S = 1.0
CAP = 256 * 1024
STREAM_LIMIT = 256 << 20  # what an endless stream sends if nobody stops reading
SOCKET_SLACK = 16 << 20  # loopback socket buffers hold a few MB the client never read


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        self.server.seen.append((self.path, self.headers.get("Host")))  # type: ignore[attr-defined]
        self.server.cookies.append(self.headers.get("Cookie"))  # type: ignore[attr-defined]
        self.close_connection = True
        path = self.path
        try:
            if path.startswith("/redirect/chain/"):
                left = int(path.rsplit("/", 1)[1])
                return self._redirect(f"/redirect/chain/{left - 1}") if left else self._send(MP4, "video/mp4")
            if path in ROUTES:
                ROUTES[path](self)
            else:
                self._send(b"not found", "text/plain", status=404)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on purpose

    def _send(self, body: bytes, content_type: str, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str | None, status: int = 302, cookie: str | None = None) -> None:
        self.send_response(status)
        if location is not None:
            self.send_header("Location", location)
        if cookie is not None:
            self.send_header("Set-Cookie", cookie)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _stream(self, first: bytes, filler: bytes, pause: float = 0.0, limit: int = STREAM_LIMIT) -> None:
        """Chunked body up to ``limit`` bytes or until the client hangs up; records what it wrote."""
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk, sent = first, 0
        try:
            while sent < limit:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
                sent += len(chunk)
                chunk = filler
                time.sleep(pause)
            self.wfile.write(b"0\r\n\r\n")
        finally:
            self.server.sent[self.path] = sent  # type: ignore[attr-defined]

    def huge(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(10 * 1024**3))
        self.end_headers()
        self.wfile.write(MP4[:100])  # then hang up: only the header may be trusted

    def slow(self) -> None:
        time.sleep(SLOW_S)
        self._send(MP4, "video/mp4")


ROUTES = {
    "/video.mp4": lambda h: h._send(MP4, "video/mp4"),
    "/image.png": lambda h: h._send(PNG, "image/png"),
    "/text.mp4": lambda h: h._send(TEXT, "video/mp4"),
    "/huge": _Handler.huge,
    "/chunked": lambda h: h._stream(MP4, b"\x00" * 65536),
    "/text-forever": lambda h: h._stream(TEXT, TEXT * 100, pause=0.01),
    "/drip": lambda h: h._stream(MP4[:2048], b"\x00", pause=0.05, limit=2048 + 100),
    "/slow": _Handler.slow,
    "/redirect/self": lambda h: h._redirect("/video.mp4"),
    "/redirect/absolute": lambda h: h._redirect(f"http://127.0.0.1:{h.server.server_port}/image.png", 307),
    "/redirect/private": lambda h: h._redirect(f"http://127.0.0.2:{h.server.other_port}/video.mp4"),
    "/redirect/internal-name": lambda h: h._redirect(f"http://internal.example:{h.server.server_port}/x.mp4"),
    "/redirect/cookie": lambda h: h._redirect("/video.mp4", cookie="session=secret; Path=/"),
    "/redirect/file": lambda h: h._redirect("file:///etc/passwd"),
    "/redirect/userinfo": lambda h: h._redirect("http://evil.example@127.0.0.1/video.mp4"),
    "/redirect/none": lambda h: h._redirect(None),
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    other_port = 0

    def __init__(self, host: str, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__((host, 0), _Handler)
        self.seen: list[tuple[str, str | None]] = []
        self.cookies: list[str | None] = []
        self.sent: dict[str, int] = {}  # path -> body bytes a stream wrote before it ended
        if ssl_context is not None:
            self.socket = ssl_context.wrap_socket(self.socket, server_side=True)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # aborted downloads and failed handshakes are expected here


@pytest.fixture(scope="module")
def servers():
    main, other = _Server("127.0.0.1"), _Server("127.0.0.2")
    main.other_port, other.other_port = other.server_port, main.server_port
    yield main, other
    for server in (main, other):
        server.shutdown()
        server.server_close()


@pytest.fixture
def base(servers) -> str:
    servers[0].seen.clear()
    return f"http://127.0.0.1:{servers[0].server_port}"


def fetch_policy(**overrides) -> MediaPolicy:
    values = dict(max_bytes=CAP, connect_timeout=1.0, read_timeout=0.3, total_timeout=3.0,
                  max_redirects=5, allowed_networks=("127.0.0.1",))
    values.update(overrides)
    return MediaPolicy(**values)


POLICY = fetch_policy()


async def test_fetches_a_real_video(base: str) -> None:
    got = await fetch_url(f"{base}/video.mp4", POLICY, kind="video")
    assert got == FetchedMedia(MP4, content_type="video/mp4", final_url=f"{base}/video.mp4", kind="video")
    with av.open(io.BytesIO(got.data)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 4


async def test_fetches_an_image_with_any_kind(base: str) -> None:
    got = await fetch_url(f"{base}/image.png", POLICY, kind=None)
    assert (got.data, got.kind, got.content_type) == (PNG, "image", "image/png")


async def test_text_named_mp4_is_unsupported(base: str) -> None:
    with pytest.raises(MediaError) as info:
        await fetch_url(f"{base}/text.mp4", POLICY, kind="video")
    err = _assert_error(info, 415, "unsupported_media")
    assert str(err) == (
        "video_url: expected a video, but the content is not a recognised video or image format "
        "(declared video/mp4)"
    )


async def test_wrong_kind_is_unsupported(base: str) -> None:
    with pytest.raises(MediaError) as info:
        await fetch_url(f"{base}/image.png", POLICY, kind="video")
    _assert_error(info, 415, "unsupported_media")


async def _bytes_sent(server, path: str) -> int:
    """What the stream handler wrote, once it noticed the client hung up."""
    for _ in range(500):
        if path in server.sent:
            return server.sent.pop(path)
        await asyncio.sleep(0.02)
    raise AssertionError(f"the server is still streaming {path}: the client never hung up")


async def test_wrong_content_is_refused_before_the_download_ends(base: str, servers) -> None:
    with pytest.raises(MediaError) as info:
        await fetch_url(f"{base}/text-forever", fetch_policy(max_bytes=1 << 30), kind="video")
    _assert_error(info, 415, "unsupported_media")
    assert await _bytes_sent(servers[0], "/text-forever") < SOCKET_SLACK  # not the 256 MB on offer


async def test_declared_length_over_cap_is_refused_up_front(base: str) -> None:
    with pytest.raises(MediaError) as info:
        await fetch_url(f"{base}/huge", POLICY, kind="video")
    err = _assert_error(info, 413, "media_too_large")
    assert str(err) == f"video_url is larger than the {CAP}-byte limit (Content-Length says {10 * 1024**3})"


async def test_stream_past_cap_is_aborted(base: str, servers) -> None:
    with pytest.raises(MediaError) as info:
        await fetch_url(f"{base}/chunked", POLICY, kind="video")
    err = _assert_error(info, 413, "media_too_large")
    assert str(err) == f"video_url is larger than the {CAP}-byte limit"
    assert await _bytes_sent(servers[0], "/chunked") < CAP + SOCKET_SLACK


async def test_slow_server_hits_read_timeout(base: str) -> None:
    """The server answers after SLOW_S, past the read timeout: without one the fetch would succeed."""
    assert POLICY.read_timeout < SLOW_S
    with pytest.raises(MediaError) as info:
        await fetch_url(f"{base}/slow", POLICY, kind="video")
    _assert_error(info, 400, "fetch_timeout")


async def test_dripping_server_hits_total_timeout(base: str) -> None:
    """A byte every 50 ms never trips the read timeout; only the total bound stops it (the whole
    drip would take 5 s and then succeed)."""
    policy = fetch_policy(read_timeout=1.0, total_timeout=0.5)
    with pytest.raises(MediaError) as info:
        await fetch_url(f"{base}/drip", policy, kind="video")
    assert str(_assert_error(info, 400, "fetch_timeout")) == "video_url: fetching took longer than 0.5 s"


async def test_upstream_error_status(base: str) -> None:
    with pytest.raises(MediaError) as info:
        await fetch_url(f"{base}/missing.mp4", POLICY, kind="video")
    err = _assert_error(info, 400, "upstream_status")
    assert str(err) == "video_url: the server answered HTTP 404 Not Found"


async def test_connection_refused(servers) -> None:
    with pytest.raises(MediaError) as info:
        await fetch_url(f"http://127.0.0.1:{_free_port()}/video.mp4", POLICY, kind="video")
    _assert_error(info, 400, "fetch_failed")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_redirects_are_followed(base: str) -> None:
    got = await fetch_url(f"{base}/redirect/self", POLICY, kind="video")
    assert (got.data, got.final_url) == (MP4, f"{base}/video.mp4")
    got = await fetch_url(f"{base}/redirect/absolute", POLICY, kind="image")
    assert (got.data, got.final_url) == (PNG, f"{base}/image.png")
    got = await fetch_url(f"{base}/redirect/chain/5", POLICY, kind="video")
    assert got.final_url == f"{base}/redirect/chain/0"


async def test_cookies_are_not_carried_across_hops(servers, base: str) -> None:
    servers[0].cookies.clear()
    got = await fetch_url(f"{base}/redirect/cookie", POLICY, kind="video")
    assert got.data == MP4
    assert servers[0].cookies == [None, None]


async def test_redirect_chain_is_capped(base: str) -> None:
    with pytest.raises(MediaError) as info:
        await fetch_url(f"{base}/redirect/chain/6", POLICY, kind="video")
    assert str(_assert_error(info, 400, "too_many_redirects")) == "video_url: more than 5 redirects"
    with pytest.raises(MediaError) as info:
        await fetch_url(f"{base}/redirect/self", fetch_policy(max_redirects=0), kind="video")
    _assert_error(info, 400, "too_many_redirects")


async def test_redirect_to_refused_loopback(servers, base: str) -> None:
    servers[1].seen.clear()
    with pytest.raises(MediaError) as info:
        await fetch_url(f"{base}/redirect/private", POLICY, kind="video")
    err = _assert_error(info, 403, "forbidden_address")
    assert "redirected to http://127.0.0.2:" in str(err)
    assert "resolves to 127.0.0.2, a loopback address; refusing to fetch" in str(err)
    assert servers[1].seen == []
    # The same redirect works when 127.0.0.2 is allowed: the refusal above was the guard's.
    loopback = fetch_policy(allowed_networks=("127.0.0.0/8",))
    got = await fetch_url(f"{base}/redirect/private", loopback, kind="video")
    assert got.data == MP4 and got.final_url.startswith("http://127.0.0.2:")


async def test_redirect_to_private_hostname(monkeypatch: pytest.MonkeyPatch, base: str) -> None:
    resolved: list[str] = []

    async def fake_resolve(host: str, port: int) -> list[str]:
        resolved.append(host)
        return ["10.0.0.5"]

    monkeypatch.setattr(netguard, "resolve_host", fake_resolve)
    with pytest.raises(MediaError) as info:
        await fetch_url(f"{base}/redirect/internal-name", POLICY, kind="video")
    err = _assert_error(info, 403, "forbidden_address")
    assert "host 'internal.example' resolves to 10.0.0.5, a private address" in str(err)
    assert resolved == ["internal.example"]


@pytest.mark.parametrize(
    "path, code",
    [
        ("/redirect/file", "invalid_url"),
        ("/redirect/userinfo", "invalid_url"),
        ("/redirect/none", "fetch_failed"),
    ],
)
async def test_bad_redirects(base: str, path: str, code: str) -> None:
    with pytest.raises(MediaError) as info:
        await fetch_url(base + path, POLICY, kind="video")
    _assert_error(info, 400, code)


async def test_loopback_outside_allow_list_is_refused(servers) -> None:
    url = f"http://127.0.0.2:{servers[1].server_port}/video.mp4"
    servers[1].seen.clear()
    with pytest.raises(MediaError) as info:
        await fetch_url(url, POLICY, kind="video")
    err = _assert_error(info, 403, "forbidden_address")
    assert str(err) == "video_url resolves to 127.0.0.2, a loopback address; refusing to fetch"
    assert servers[1].seen == []
    got = await fetch_url(url, fetch_policy(allow_private=True), kind="video")
    assert got.data == MP4


async def test_localhost_name_is_resolved_and_checked(servers) -> None:
    url = f"http://localhost:{servers[0].server_port}/video.mp4"
    with pytest.raises(MediaError) as info:
        await fetch_url(url, fetch_policy(allowed_networks=()), kind="video")
    _assert_error(info, 403, "forbidden_address")
    got = await fetch_url(url, fetch_policy(allowed_networks=("localhost",)), kind="video")
    assert (got.data, got.final_url) == (MP4, url)


async def test_connection_is_pinned_to_the_checked_address(monkeypatch: pytest.MonkeyPatch, servers) -> None:
    calls: list[tuple[str, int]] = []

    async def fake_resolve(host: str, port: int) -> list[str]:
        calls.append((host, port))
        return ["127.0.0.3", "127.0.0.1"]  # nothing listens on .3: the next checked address is used

    monkeypatch.setattr(netguard, "resolve_host", fake_resolve)
    port = servers[0].server_port
    servers[0].seen.clear()
    loopback = fetch_policy(allowed_networks=("127.0.0.0/8",))
    got = await fetch_url(f"http://media.example:{port}/video.mp4", loopback, kind="video")
    assert (got.data, got.final_url) == (MP4, f"http://media.example:{port}/video.mp4")
    assert calls == [("media.example", port)]  # resolved once, by us
    assert servers[0].seen == [("/video.mp4", f"media.example:{port}")]


async def test_any_private_answer_refuses_the_host(monkeypatch: pytest.MonkeyPatch, servers) -> None:
    async def fake_resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.1", "10.0.0.5"]

    monkeypatch.setattr(netguard, "resolve_host", fake_resolve)
    servers[0].seen.clear()
    with pytest.raises(MediaError) as info:
        await fetch_url(f"http://media.example:{servers[0].server_port}/video.mp4", POLICY, kind="video")
    _assert_error(info, 403, "forbidden_address")
    assert servers[0].seen == []


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/video.mp4",
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/_x",
        "http:///video.mp4",
        "http://",
        "video.mp4",
        "http://user:pw@127.0.0.1/video.mp4",
        "http://evil.example@127.0.0.1/video.mp4",
        "http://127.0.0.1\\@evil.example/video.mp4",
        "http://127.0.0.1 /video.mp4",
        "http://127.0.0.1/vid\neo.mp4",
        "http://2130706433/video.mp4",
        "http://0x7f.1/video.mp4",
        "http://127.1/video.mp4",
        "http://127.0.0.1:0/video.mp4",
        "http://127.0.0.1:99999/video.mp4",
        "http://[fe80::1%25eth0]/video.mp4",
        "http://example.com/" + "a" * 9000,
    ],
)
async def test_malformed_urls(url: str) -> None:
    with pytest.raises(MediaError) as info:
        await fetch_url(url, POLICY, kind="video")
    _assert_error(info, 400, "invalid_url")


# ---------------------------------------------------------------- https: SNI and certificate use the name


def _self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp / f"{name}.crt", tmp / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}"],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI for a test certificate")
async def test_https_sends_sni_and_verifies_the_hostname(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = _self_signed(tmp_path, "media.example")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    sni: list[str | None] = []
    server_ctx.sni_callback = lambda sock, name, ctx: sni.append(name)
    server = _Server("127.0.0.1", ssl_context=server_ctx)
    try:
        async def fake_resolve(host: str, port: int) -> list[str]:
            return ["127.0.0.1"]

        monkeypatch.setattr(netguard, "resolve_host", fake_resolve)
        client_ctx = ssl.create_default_context(cafile=str(cert))
        monkeypatch.setattr(fetcher, "_ssl_context", client_ctx)
        url = f"https://media.example:{server.server_port}/image.png"
        got = await fetch_url(url, POLICY, kind="image")
        assert (got.data, got.final_url) == (PNG, url)
        assert sni == ["media.example"]
        assert server.seen == [("/image.png", f"media.example:{server.server_port}")]

        # A certificate for another name fails verification even though the IP is the same.
        other_cert, _ = _self_signed(tmp_path, "other.example")
        monkeypatch.setattr(fetcher, "_ssl_context", ssl.create_default_context(cafile=str(other_cert)))
        with pytest.raises(MediaError) as info:
            await fetch_url(url, POLICY, kind="image")
        assert "certificate" in str(_assert_error(info, 400, "fetch_failed")).lower()
    finally:
        server.shutdown()
        server.server_close()
