"""Bad input against a real ``llamavid serve``: every case gets a 4xx JSON error
``{"error": {"message", "type", "code"}}`` whose message names the problem, nothing reaches a
non-allow-listed address, and the server keeps serving (checked last, with its log)."""

from __future__ import annotations

import base64
import io
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest
from PIL import Image

from tests.server.conftest import API_KEYS, STRICT_MAX_VIDEO_BYTES
from tests.server.live import assert_api_error, scrape, wait_for, wait_idle
from tests.videos import write_video

CHAT, ASK, VIDEOS = "/v1/chat/completions", "/v1/ask", "/v1/videos"
INVALID = "invalid_request"
TEXT_MP4 = b"I am a text file that calls itself video.mp4\n" * 20


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (10, 200, 10)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Ctx:
    video: bytes  # a valid 3 s mp4
    video_id: str
    host: str  # the loopback media host
    many_url: str  # 140 s at 8 fps


@pytest.fixture(scope="module")
def ctx(videos, media_host, short_video_id) -> Ctx:
    return Ctx(videos.short.read_bytes(), short_video_id, media_host.url, media_host.media(videos.many))


def upload(name: str, data: bytes | Callable[[Ctx], bytes], **form) -> Callable[[Ctx], tuple]:
    def build(c: Ctx) -> tuple:
        body = data(c) if callable(data) else data
        return "POST", "/v1/videos", {"files": {"file": (name, body, "video/mp4")}, "data": form}
    return build


def post(path: str, body: dict | Callable[[Ctx], dict]) -> Callable[[Ctx], tuple]:
    return lambda c: ("POST", path, {"json": body(c) if callable(body) else body})


def raw(path: str, content: bytes, content_type: str) -> Callable[[Ctx], tuple]:
    return lambda c: ("POST", path, {"content": content, "headers": {"content-type": content_type}})


def chat(**body) -> dict:
    return {"messages": [{"role": "user", "content": "What happens?"}], **body}


def video_chat(url: str, **body) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                      {"type": "text", "text": "What happens?"}]}], **body}


# name: (request builder, status, words the message must contain, code)
CASES: dict[str, tuple[Callable[[Ctx], tuple], int, tuple[str, ...], str | None]] = {
    # -- files that are not (whole) videos
    "corrupt": (upload("corrupt.mp4", lambda c: c.video[:48] + bytes(len(c.video) - 48)), 400,
                ("cannot decode", "corrupt"), "invalid_video"),
    "truncated": (upload("half.mp4", lambda c: c.video[: len(c.video) // 2]), 400, ("truncated",),
                  "invalid_video"),
    "truncated-header": (upload("head.mp4", lambda c: c.video[:40]), 400, ("cannot decode",),
                         "invalid_video"),
    "empty": (upload("empty.mp4", b""), 415, ("empty",), "unsupported_media"),
    "text-named-mp4": (upload("video.mp4", TEXT_MP4), 415, ("not a recognised video",), "unsupported_media"),
    "image-as-video": (upload("photo.mp4", png_bytes()), 415, ("expected a video", "image"),
                       "unsupported_media"),
    "random-bytes": (upload("noise.mp4", bytes(range(256)) * 8), 415, ("not a recognised",),
                     "unsupported_media"),
    "video-as-image": (post(ASK, lambda c: {"question": "q", "image_url": "data:image/png;base64,"
                                                  + base64.b64encode(c.video).decode()}),
                       415, ("image_url", "expected an image"), "unsupported_media"),
    "bad-data-url": (post(ASK, {"question": "q", "image_url": "data:image/png;base64,@@@"}), 400,
                     ("base64",), "invalid_data_url"),
    "no-file-part": (lambda c: ("POST", VIDEOS, {"files": {"video": ("a.mp4", c.video, "video/mp4")}}),
                     400, ("'file'",), "missing_file"),
    # -- URLs
    # Live requests only ever name loopback targets: 127.0.0.1 is allow-listed, 127.0.0.2 is not.
    # Private, link-local and public literals are covered by the address check's unit tests.
    "refused-url-videos": (post(VIDEOS, {"url": "http://127.0.0.2/v.mp4"}), 403,
                           ("127.0.0.2", "loopback"), "forbidden_address"),
    "refused-url-ask": (post(ASK, {"question": "q", "video_url": "http://127.0.0.2/v.mp4"}), 403,
                        ("video_url", "loopback"), "forbidden_address"),
    "refused-url-chat": (post(CHAT, video_chat("http://127.0.0.2/v.mp4")), 403, ("127.0.0.2",),
                         "forbidden_address"),
    "mapped-ipv6-url": (post(VIDEOS, {"url": "http://[::ffff:127.0.0.2]/v.mp4"}), 403,
                        ("127.0.0.2",), "forbidden_address"),
    "ipv6-loopback-url": (post(VIDEOS, {"url": "http://[::1]/v.mp4"}), 403, ("loopback",),
                          "forbidden_address"),
    "numeric-host-url": (post(VIDEOS, {"url": "http://2130706433/v.mp4"}), 400, ("non-canonical",),
                         "invalid_url"),
    "file-url": (post(VIDEOS, {"url": "file:///etc/passwd"}), 400, ("http or https",), "invalid_url"),
    "missing-on-host": (post(VIDEOS, lambda c: {"url": f"{c.host}/media/missing.mp4"}), 400,
                        ("404",), "upstream_status"),
    # -- bodies
    "invalid-json": (raw(ASK, b'{"question": "q",', "application/json"), 400, ("not valid JSON",),
                     "invalid_json"),
    "invalid-json-chat": (raw(CHAT, b"{messages: []}", "application/json"), 400, ("JSON",), "invalid_json"),
    "invalid-json-videos": (raw(VIDEOS, b"{", "application/json"), 400, ("json",), INVALID),
    "json-array": (raw(ASK, b"[1, 2]", "application/json"), 400, ("body",), INVALID),
    "not-utf8": (raw(ASK, b'{"question": "\xff\xfe"}', "application/json"), 400, ("parsing the body",),
                 INVALID),
    "xml-videos": (raw(VIDEOS, b"<video/>", "application/xml"), 415, ("multipart/form-data",),
                   "unsupported_content_type"),
    "text-ask": (raw(ASK, b"what is it?", "text/plain"), 415, ("text/plain", "application/json"),
                 "unsupported_content_type"),
    "form-chat": (raw(CHAT, b"messages=hi", "application/x-www-form-urlencoded"), 415,
                  ("application/x-www-form-urlencoded",), "unsupported_content_type"),
    "unknown-field-ask": (post(ASK, {"question": "q", "bogus": 1}), 400, ("bogus", "unknown field"),
                          INVALID),
    "unknown-field-chat": (post(CHAT, chat(frobnicate=True)), 400, ("frobnicate", "unknown field"),
                           INVALID),
    "unknown-field-videos": (post(VIDEOS, {"url": "http://127.0.0.1/v.mp4", "colour": "red"}), 400,
                             ("colour", "unknown field"), INVALID),
    "unknown-part-field": (post(CHAT, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "q", "extra": 1}]}]}), 400, ("extra", "unknown field"), INVALID),
    "unknown-part-type": (post(CHAT, {"messages": [{"role": "user", "content": [
        {"type": "audio_url", "audio_url": {"url": "x"}}]}]}), 400, ("audio_url",), INVALID),
    "missing-question": (post(ASK, {"video_id": "vid-000000000000000000000000"}), 400,
                         ("question", "field required"), INVALID),
    # -- numbers
    "negative-fps": (post(ASK, lambda c: {"question": "q", "video_id": c.video_id, "fps": -1}), 400,
                     ("fps", "greater than 0"), INVALID),
    "zero-fps": (post(CHAT, chat(fps=0)), 400, ("fps",), INVALID),
    "absurd-fps": (post(ASK, lambda c: {"question": "q", "video_id": c.video_id, "fps": 1e9}), 400,
                   ("fps", "limit"), "invalid_fps"),
    "negative-fps-form": (upload("short.mp4", lambda c: c.video, fps="-2"), 400, ("fps",), INVALID),
    "text-fps-form": (upload("short.mp4", lambda c: c.video, fps="fast"), 400, ("fps", "number"),
                      INVALID),
    "absurd-fps-url": (post(VIDEOS, lambda c: {"url": f"{c.host}/media/short.mp4", "fps": 500}), 400,
                       ("fps", "limit"), "invalid_fps"),
    "negative-max-tokens": (post(ASK, {"question": "q", "max_tokens": -5}), 400, ("max_tokens",),
                            INVALID),
    "zero-max-tokens": (post(CHAT, chat(max_tokens=0)), 400, ("max_tokens",), INVALID),
    "absurd-max-tokens": (post(ASK, {"question": "q", "max_tokens": 10**9}), 400, ("max_tokens", "limit"),
                          "invalid_max_tokens"),
    "absurd-max-completion-tokens": (post(CHAT, chat(max_completion_tokens=10**6)), 400, ("max_tokens",),
                                     "invalid_max_tokens"),
    "fractional-max-tokens": (post(ASK, {"question": "q", "max_tokens": 2.5}), 400, ("max_tokens",),
                              INVALID),
    "negative-max-frames": (post(CHAT, chat(max_frames=-3)), 400, ("max_frames",), INVALID),
    "absurd-max-frames": (post(ASK, lambda c: {"question": "q", "video_id": c.video_id,
                                               "max_frames": 10**12}),
                          400, ("max_frames", "limit"), "invalid_max_frames"),
    "infinite-start": (raw(ASK, b'{"question": "q", "start_time": Infinity}', "application/json"), 400,
                       ("start_time", "finite"), INVALID),
    "huge-end": (post(ASK, lambda c: {"question": "q", "video_id": c.video_id, "end_time": 1e308}), 400,
                 ("end_time",), "invalid_time_range"),
    "end-before-start": (post(ASK, {"question": "q", "start_time": 5, "end_time": 2}), 400,
                         ("end_time must be greater than start_time",), INVALID),
    "start-past-the-end": (post(ASK, lambda c: {"question": "q", "video_id": c.video_id, "start_time": 60}),
                           400, ("no frames", "3.0s"), "empty_frame_range"),
    "absurd-temperature": (post(CHAT, chat(temperature=50)), 400, ("temperature",), INVALID),
    "nan-top-p": (raw(ASK, b'{"question": "q", "top_p": NaN}', "application/json"), 400, ("top_p",),
                  INVALID),
    "absurd-seed": (post(CHAT, chat(seed=2**70, temperature=1.0)), 400, ("seed",), INVALID),
    "too-many-stops": (post(CHAT, chat(stop=["a", "b", "c", "d", "e"])), 400, ("stop",), INVALID),
    "n-nine": (post(CHAT, chat(n=9)), 400, ("n",), INVALID),
    "top-logprobs-alone": (post(CHAT, chat(top_logprobs=2)), 400, ("top_logprobs needs logprobs",), INVALID),
    # -- text that no tokenizer can encode (a lone UTF-16 surrogate, legal in JSON)
    "surrogate-chat": (raw(CHAT, b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "application/json"),
                       400, ("messages.0.content", "unpaired", "d800"), INVALID),
    "surrogate-chat-part": (raw(CHAT, b'{"messages": [{"role": "user", "content": [{"type": "text", '
                                      b'"text": "\\udfff"}]}]}', "application/json"),
                            400, ("text", "unpaired", "dfff"), INVALID),
    "surrogate-ask": (raw(ASK, b'{"question": "why \\ud83d?"}', "application/json"), 400,
                      ("question", "unpaired"), INVALID),
    "surrogate-stop": (raw(CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}',
                           "application/json"), 400, ("stop", "unpaired"), INVALID),
    # -- conversations
    "over-long-question": (post(ASK, {"question": "why " * 5000}), 400, ("20000 characters", "limit"),
                           "question_too_long"),
    "over-long-chat": (post(CHAT, {"messages": [{"role": "user", "content": "x" * 16_001}]}), 400, ("limit",),
                       "question_too_long"),
    "blank-question": (post(ASK, {"question": "   "}), 400, ("empty",), "empty_question"),
    "no-messages": (post(CHAT, {"messages": []}), 400, ("messages",), INVALID),
    "ends-with-assistant": (post(CHAT, {"messages": [{"role": "user", "content": "a"},
                                                     {"role": "assistant", "content": "b"}]}), 400,
                            ("last message",), "invalid_messages"),
    "tool-role": (post(CHAT, {"messages": [{"role": "tool", "content": "a"}]}), 400, ("role",), INVALID),
    "too-many-media": (post(CHAT, lambda c: {"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": c.video_id}},
        *({"type": "video_url", "video_url": {"url": f"vid-00000000000000000000000{i}"}} for i in range(4)),
        {"type": "text", "text": "q"}]}]}), 400, ("at most 4", "max_media"), "too_many_media"),
    "two-sources": (post(ASK, lambda c: {"question": "q", "video_id": c.video_id, "image_url": "data:,"}),
                    400, ("at most one of",), INVALID),
    "unknown-template": (post(CHAT, chat(template="alpaca")), 400, ("alpaca", "template"),
                         "invalid_template"),
    # -- ids
    "unknown-video-id": (post(ASK, {"question": "q", "video_id": "vid-000000000000000000000000"}), 404,
                         ("vid-000000000000000000000000",), "video_not_found"),
    "malformed-video-id": (post(ASK, {"question": "q", "video_id": "../../etc/passwd"}), 404,
                           ("no video",), "video_not_found"),
    "unknown-video-id-chat": (post(CHAT, video_chat("vid-111111111111111111111111")), 404, ("no video",),
                              "video_not_found"),
    "get-unknown-video": (lambda c: ("GET", f"{VIDEOS}/vid-222222222222222222222222", {}), 404,
                          ("no video",),
                          "video_not_found"),
    "unknown-frame": (lambda c: ("GET", f"/v1/videos/{c.video_id}/frames/99.jpg", {}), 404, ("no frame 99",),
                      "frame_not_found"),
    "unknown-route": (lambda c: ("GET", "/v1/nothing-here", {}), 404, ("no route",), "not_found"),
    # -- the context
    # a video's frames are thinned to fit; a conversation that leaves no room for one frame cannot be
    "conversation-does-not-fit": (post(CHAT, lambda c: {"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": c.many_url}}, {"type": "text", "text": "why " * 2400}]}]}),
        400, ("do not fit", "context of 2048"), "context_length_exceeded"),
    "conversation-does-not-fit-ask": (post(ASK, lambda c: {"question": "why " * 2400, "video_url": c.many_url}),
                                      400, ("do not fit", "2048"), "context_length_exceeded"),
    # -- subtitles and frame selection
    "subtitles-not-srt": (post(ASK, lambda c: {"question": "q", "video_id": c.video_id,
                                               "subtitles": "hello there, no timings"}),
                          400, ("subtitles", "not SRT or WebVTT"), "invalid_subtitles"),
    "subtitles-bad-timing": (post(ASK, lambda c: {"question": "q", "video_id": c.video_id,
                                                  "subtitles": "1\n00:00:01,000 -> 00:00:02,000\nHi\n"}),
                             400, ("subtitles", "line 2"), "invalid_subtitles"),
    "subtitles-binary-data-url": (post(ASK, lambda c: {"question": "q", "video_id": c.video_id,
                                                       "subtitles": "data:text/plain;base64,AAECAwQ="}),
                                  415, ("subtitles", "binary"), "unsupported_media"),
    "subtitles-with-an-image": (post(ASK, lambda c: {"question": "q", "image_url": "data:,",
                                                     "subtitles": "auto"}),
                                400, ("subtitles", "video"), "invalid_request"),
    "frame-selection-unknown": (post(ASK, lambda c: {"question": "q", "video_id": c.video_id,
                                                     "frame_selection": "best"}),
                                400, ("frame_selection",), INVALID),
    "subtitles-from-a-refused-address": (post(ASK, lambda c: {
        "question": "q", "video_id": c.video_id, "subtitles": "http://127.0.0.2:9/subs.srt"}),
        403, ("subtitles", "127.0.0.2"), "forbidden_address"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_a_clear_4xx(name: str, http: httpx.Client, ctx: Ctx) -> None:
    build, status, words, code = CASES[name]
    method, path, kwargs = build(ctx)
    response = http.request(method, path, **kwargs)
    assert_api_error(response, status, *words, code=code)


def test_refused_addresses_are_never_connected_to(http: httpx.Client, media_host) -> None:
    """Loopback addresses outside the allow-list, in several spellings, pointing at a listener that
    counts connections: every one is refused before any connection is made."""
    before = media_host.trap.connections
    port = media_host.trap_url.rsplit(":", 1)[1]
    for url in (f"http://127.0.0.2:{port}/v.mp4", f"http://[::ffff:127.0.0.2]:{port}/v.mp4",
                f"http://[::ffff:7f00:2]:{port}/v.mp4"):
        response = http.post("/v1/videos", json={"url": url})
        assert_api_error(response, 403, "refusing", code="forbidden_address")
    assert media_host.trap.connections == before


def test_redirect_to_a_non_allowed_address_is_refused(http: httpx.Client, media_host) -> None:
    """127.0.0.1 is allow-listed; its redirect to 127.0.0.2 (loopback, not allowed) is refused."""
    before = media_host.trap.connections
    url = f"{media_host.url}/redirect-private/short.mp4"
    for response in (http.post("/v1/videos", json={"url": url}),
                     http.post("/v1/ask", json={"question": "q", "max_tokens": 2, "video_url": url})):
        error = assert_api_error(response, 403, "redirected to", "127.0.0.2", code="forbidden_address")
        assert media_host.trap_url in error["message"]
    assert media_host.trap.connections == before  # the server never connected there
    assert "/redirect-private/short.mp4" in media_host.requests


def test_declared_huge_body_is_refused_without_reading_it(server) -> None:
    """Content-Length of 1 TB: 413 at once, while the client has sent only the headers."""
    host, port = server.url.removeprefix("http://").split(":")
    # A server that waited for the body would leave this read to time out.
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/videos HTTP/1.1\r\nHost: test\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 1000000000000\r\n\r\n--b\r\n")
        response = _read_http_response(sock)
    status, headers, body = response
    assert status == 413 and headers["content-type"] == "application/json"
    assert_api_error(httpx.Response(status, headers=headers, content=body), 413, "1000000000000", "limit",
                     code="request_too_large")


def _read_http_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _multipart_stream(size: int):
    yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.mp4"\r\n'
    yield b"Content-Type: video/mp4\r\n\r\n"
    head = b"\x00\x00\x00\x20ftypisom"  # sniffs as MP4: the size, not the type, is what is wrong
    yield head
    sent = len(head)
    while sent < size:
        piece = min(65536, size - sent)
        yield b"\x00" * piece
        sent += piece
    yield b"\r\n--b--\r\n"


@pytest.mark.parametrize(("size", "words", "code"), [
    (STRICT_MAX_VIDEO_BYTES + 10_000, (f"{STRICT_MAX_VIDEO_BYTES}-byte limit",), "media_too_large"),
    (20 * STRICT_MAX_VIDEO_BYTES, ("video upload limit", "exceeds"), "request_too_large"),
], ids=["file", "body"])
def test_streamed_body_over_the_limit(size: int, words: tuple[str, ...], code: str, strict_http: httpx.Client) -> None:
    """A chunked upload (no Content-Length) past ``max_video_bytes``: 413 from the upload reader
    (just past it, within the form's allowance) or from the body limit while the bytes stream in."""
    response = strict_http.post("/v1/videos", content=_multipart_stream(size),
                                headers={"content-type": "multipart/form-data; boundary=b"})
    assert_api_error(response, 413, *words, code=code)


def test_a_huge_upload_is_cut_off_at_the_limit(strict_server) -> None:
    """300 MB sent chunked at a server that takes 200 KB videos: the 413 names the video limit and
    arrives while the client is still sending, and the server closes the connection, so the client
    stops after about the limit (plus what the sockets buffer) instead of sending all 300 MB."""
    host, port = strict_server.url.removeprefix("http://").split(":")
    piece = b"\x00" * 65536
    sent, total = 0, 300 << 20
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/videos HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
                     b"Authorization: Bearer " + API_KEYS[0].encode() + b"\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")
        first = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.mp4"\r\n\r\n'
        sock.sendall(b"%x\r\n%s\r\n" % (len(first), first))
        try:
            while sent < total and not select.select([sock], [], [], 0)[0]:  # until the answer arrives
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, headers, body = _read_http_response(sock)
        assert headers.get("connection") == "close"
        try:
            assert sock.recv(1) == b""  # the server hung up
        except ConnectionResetError:
            pass
    assert status == 413
    assert_api_error(httpx.Response(status, headers=headers, content=body), 413, "video upload limit",
                     "LLAMAVID_MAX_VIDEO_BYTES", str(STRICT_MAX_VIDEO_BYTES + (64 << 10)), code="request_too_large")
    assert sent < STRICT_MAX_VIDEO_BYTES + (32 << 20), f"the client could send {sent} bytes"


def test_junk_after_a_valid_mp4_is_refused(http: httpx.Client, videos) -> None:
    """A valid MP4 with a megabyte of something else after its last box is not a 3 s video."""
    data = videos.short.read_bytes() + b"\x13" * (1 << 20)
    response = http.post("/v1/videos", files={"file": ("padded.mp4", data, "video/mp4")})
    assert_api_error(response, 400, "1048576 bytes", "after its last box", code="invalid_video")


@pytest.mark.parametrize("route", ["media", "chunked"])
def test_fetched_video_over_the_limit(route: str, strict_http: httpx.Client, media_host, videos) -> None:
    """A URL whose body is larger than ``max_video_bytes``: refused by its declared size or mid-download."""
    big = videos.noisy("noisy.mp4")
    assert big.stat().st_size > STRICT_MAX_VIDEO_BYTES
    media_host.media(big)
    response = strict_http.post("/v1/videos", json={"url": f"{media_host.url}/{route}/noisy.mp4"})
    detail = "Content-Length says" if route == "media" else "byte limit"
    assert_api_error(response, 413, f"{STRICT_MAX_VIDEO_BYTES}-byte limit", detail, code="media_too_large")


def test_truncated_avi_does_not_take_the_server_down(http: httpx.Client, videos, server) -> None:
    """An AVI cut mid-stream once crashed decord's in-memory reader, and with it the whole
    process (fixed in model/video.py by spooling to a file). Now: a clean 4xx, or a video that
    extracts what is there; never a dead server."""
    avi = videos.folder / "clip.avi"
    write_video(avi, seconds=30, fps=10, codec="mpeg4")
    data = avi.read_bytes()
    cut = data[: int(len(data) * 0.6)]
    response = http.post("/v1/videos", files={"file": ("cut.avi", cut, "video/x-msvideo")})
    if response.status_code == 202:
        final = wait_for(lambda: (b := http.get(f"/v1/videos/{response.json()['id']}").json())["status"]
                         in ("ready", "failed") and b, 30, what="the cut AVI to finish extracting")
        assert final["status"] == "ready" or final["error"]["message"], final
    else:
        assert_api_error(response, 400, "cannot decode", code="invalid_video")
    assert server.proc.poll() is None
    assert http.get("/health").status_code == 200


def test_server_keeps_serving_after_the_bad_input(server, strict_server, http: httpx.Client,
                                                  ctx: Ctx) -> None:
    """Last in this module: a normal request succeeds, the process lives, its log has no Traceback."""
    answer = http.post(ASK, json={"question": "Still there?", "video_id": ctx.video_id, "max_tokens": 3})
    assert answer.status_code == 200 and answer.json()["usage"]["visual_tokens"] == 6
    wait_idle(server.url)
    errors = scrape(server.url)
    assert errors["llamavid_http_requests_total", {"route": "/v1/ask", "status": "500"}] == 0
    for process in (server, strict_server):
        assert process.proc.poll() is None
        assert "Traceback" not in process.output(), process.output()[-3000:]
