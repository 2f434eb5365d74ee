"""Safe media intake: http(s) URLs, ``data:`` URLs and uploads, each capped and sniffed.

Pure library code (no FastAPI). Every failure is a ``MediaError`` with a 4xx status, a stable
``code`` and a message naming the problem; routes turn it into an error response.

Fetching resolves the host itself, checks every address (``server.fetch.netguard``), then connects
to a checked address with the original ``Host`` header and TLS SNI, so DNS cannot change the
answer between check and connect. Redirects are followed by hand and re-checked at every hop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ssl
import urllib.parse
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Literal, Protocol

import httpx

from . import netguard
from .netguard import MediaError, MediaPolicy, check_address

__all__ = [
    "FetchedMedia", "MediaError", "MediaPolicy", "check_address", "decode_data_url", "fetch_url",
    "read_upload", "sniff_media_kind",
]

MediaKind = Literal["video", "image", "subtitles"]
SNIFF_BYTES = 1024  # enough for every signature below, including five MPEG-TS sync bytes
TIMEOUT_STATUS = 400  # not 408: clients such as openai-python retry 408s, multiplying slow fetches
_REDIRECTS = {301, 302, 303, 307, 308}
_USER_AGENT = "llamavid-serve media-fetcher"


@dataclass(frozen=True)
class FetchedMedia:
    data: bytes
    content_type: str | None  # declared media type (header or data: URL), lower-case, no params
    final_url: str  # after redirects; "data:" for data URLs, "upload:<filename>" for uploads
    kind: str  # sniffed: "video", "image" or "subtitles"
    cache_headers: dict[str, str] = field(default_factory=dict, compare=False)  # the response's, lower-case names
    not_modified: bool = False  # a 304 to a conditional request: no body; the caller's copy is current


class AsyncReadable(Protocol):
    async def read(self, size: int = -1) -> bytes: ...


# ---------------------------------------------------------------- sniffing

_QUICKTIME_ATOMS = (b"ftyp", b"moov", b"mdat", b"wide")
_HEIF_BRANDS = (
    b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis",
)
_BMP_SIZES = (12, 40, 52, 56, 64, 108, 124)  # DIB header sizes, stored at offset 14


_ANIMATED = ("GIF", "WebP")  # image formats that may be animations, accepted where a video is expected
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _sniff(head: bytes) -> tuple[str, str] | None:
    """(kind, format name) from the first bytes of a file, or None if unrecognised."""
    if head[4:8] in _QUICKTIME_ATOMS:
        if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
            return None  # HEIF/AVIF stills: not decodable by the pipeline
        return "video", "MP4/QuickTime"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video", "Matroska/WebM"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "video", "AVI"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image", "WebP"
    for offset, stride in ((0, 188), (4, 192)):  # MPEG-TS, then M2TS (4-byte timestamp prefix)
        syncs = head[offset::stride][:5]
        if len(syncs) >= 2 and set(syncs) == {0x47}:
            return "video", "MPEG-TS"
    if head.startswith((b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")):
        return "video", "MPEG-PS"
    if head.startswith(b"FLV\x01"):
        return "video", "FLV"
    if head.startswith(b"OggS"):
        return "video", "Ogg"
    if head.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"):
        return "video", "ASF/WMV"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image", "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "image", "JPEG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image", "GIF"
    if head.startswith(b"BM") and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_SIZES:
        return "image", "BMP"
    if head.startswith(b"ID3") or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "audio", "MP3"
    if head.startswith(b"fLaC"):
        return "audio", "FLAC"
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return "audio", "WAV"
    return None


def sniff_media_kind(head: bytes) -> MediaKind | None:
    """"video", "image" or None, from magic bytes only (never from names or headers)."""
    found = _sniff(head)
    return None if found is None or found[0] == "audio" else found[0]  # type: ignore[return-value]


def _check_kind(head: bytes, kind: str | None, what: str, content_type: str | None) -> MediaKind:
    if kind == "subtitles":  # text: whether it is SRT or WebVTT is for the subtitle parser to say
        if not head or (b"\x00" in head and not head.startswith(_UTF16_BOMS)):
            got = "empty" if not head else "binary"
            raise MediaError(415, "unsupported_media", f"{what}: expected SRT or WebVTT text, but the content is {got}")
        return "subtitles"
    found = _sniff(head)
    declared = f" (declared {content_type})" if content_type else ""
    if found is None:
        expected = _article(kind) if kind else "a video or image"
        got = "empty" if not head else f"not a recognised video or image format{declared}"
        raise MediaError(415, "unsupported_media", f"{what}: expected {expected}, but the content is {got}")
    if found[0] == "audio":
        raise MediaError(415, "audio_only", f"{what}: the content is audio ({found[1]}) with no pictures; "
                                            f"send {_article(kind or 'video')}")
    if kind == "video" and found[1] in _ANIMATED:
        return "video"  # an animation; a still one is a one-frame video
    if kind is not None and found[0] != kind:
        raise MediaError(
            415, "unsupported_media",
            f"{what}: expected {_article(kind)}, but the content is {_article(found[0])} ({found[1]})",
        )
    return found[0]


def _article(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _media_type(value: str | None) -> str | None:
    value = (value or "").split(";", 1)[0].strip().lower()
    return value or None


def _too_large(what: str, max_bytes: int, detail: str = "") -> MediaError:
    return MediaError(413, "media_too_large", f"{what} is larger than the {max_bytes}-byte limit{detail}")


def _what(kind: str | None, suffix: str) -> str:
    """The input's name in messages: "video_url", "image", "upload"..."""
    if kind not in (None, "video", "image", "subtitles"):
        raise ValueError(f"kind must be 'video', 'image', 'subtitles' or None, not {kind!r}")
    return f"{kind}{suffix}" if kind else suffix.lstrip("_")


# ---------------------------------------------------------------- data: URLs and uploads


def decode_data_url(
    url: str, max_bytes: int, *, kind: MediaKind | None = None, field: str | None = None
) -> FetchedMedia:
    """Decode ``data:[<mime>][;param]*[;base64],<payload>`` with the size cap checked first."""
    what = field or _what(kind, "_url")
    if url[:5].lower() != "data:":
        raise MediaError(400, "invalid_data_url", f"{what} is not a data: URL")
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise MediaError(400, "invalid_data_url", f"{what} is a data: URL without ',' before its payload")
    params = [p.strip() for p in header.split(";")]
    is_base64 = len(params) > 1 and params[-1].lower() == "base64"
    # A payload of n characters decodes to at most 3n/4 (base64) or n (percent-encoded) bytes.
    bound = len(payload) // 4 * 3 if is_base64 else len(payload) // 3
    if bound > max_bytes:
        raise _too_large(what, max_bytes, f" (the data: URL carries about {bound} bytes)")
    if is_base64:
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise MediaError(400, "invalid_data_url", f"{what} has an invalid base64 payload") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise _too_large(what, max_bytes)
    content_type = _media_type(params[0])
    found = _check_kind(data[:SNIFF_BYTES], kind, what, content_type)
    return FetchedMedia(data=data, content_type=content_type, final_url="data:", kind=found)


async def read_upload(
    stream: AsyncReadable, max_bytes: int, kind: MediaKind | None = None, *, field: str | None = None,
    chunk_size: int = 1 << 20,
) -> FetchedMedia:
    """Read an upload (anything with ``async read(size)``) in chunks, refusing past ``max_bytes``.

    ``content_type`` and ``filename`` attributes are used when present (e.g. Starlette's UploadFile).
    """
    what = field or _what(kind, "") or "upload"
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = await stream.read(min(chunk_size, max_bytes + 1 - total))
        if not chunk:
            break
        total += len(chunk)
        if total > max_bytes:
            raise _too_large(what, max_bytes)
        chunks.append(chunk)
    data = b"".join(chunks)
    content_type = _media_type(getattr(stream, "content_type", None))
    found = _check_kind(data[:SNIFF_BYTES], kind, what, content_type)
    name = getattr(stream, "filename", None) or ""
    return FetchedMedia(data=data, content_type=content_type, final_url=f"upload:{name}", kind=found)


# ---------------------------------------------------------------- http(s)

_ssl_context: ssl.SSLContext | None = None  # built once; honours SSL_CERT_FILE / SSL_CERT_DIR


def _default_ssl_context() -> ssl.SSLContext:
    global _ssl_context
    if _ssl_context is None:
        _ssl_context = httpx.create_ssl_context()
    return _ssl_context


CACHE_HEADERS = ("cache-control", "expires", "date", "age", "etag", "last-modified")


async def fetch_url(
    url: str, policy: MediaPolicy, *, kind: MediaKind | None = None, field: str | None = None,
    validators: dict[str, str] | None = None,
) -> FetchedMedia:
    """GET ``url`` under ``policy``; ``field`` names the input in messages (default "<kind>_url").

    ``validators`` (``If-None-Match`` / ``If-Modified-Since``) make the request conditional: a 304
    answer comes back as ``not_modified`` with no data."""
    what = field or _what(kind, "_url")
    try:
        return await asyncio.wait_for(_fetch(url, policy, kind, what, validators or {}), policy.total_timeout)
    except asyncio.TimeoutError:
        message = f"{what}: fetching took longer than {policy.total_timeout:g} s"
        raise MediaError(TIMEOUT_STATUS, "fetch_timeout", message) from None


async def _fetch(url: str, policy: MediaPolicy, kind: MediaKind | None, what: str,
                 validators: dict[str, str]) -> FetchedMedia:
    target = netguard.parse_http_url(url, what)
    timeout = httpx.Timeout(
        connect=policy.connect_timeout, read=policy.read_timeout, write=policy.read_timeout,
        pool=policy.connect_timeout,
    )
    async with httpx.AsyncClient(
        timeout=timeout, follow_redirects=False, trust_env=False, verify=_default_ssl_context(),
        # No pooling: a TLS connection opened for one hostname must never carry another's request.
        limits=httpx.Limits(max_keepalive_connections=0),
        headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"},  # no decompression bombs
        cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),  # keep no cookies between hops
    ) as client:
        for hop in range(policy.max_redirects + 1):
            hop_what = what if hop == 0 else f"{what} (redirected to {target})"
            response = await _send_pinned(client, target, policy, hop_what, validators)
            try:
                if response.status_code == 304 and validators:
                    return FetchedMedia(b"", _media_type(response.headers.get("content-type")), str(target),
                                        kind or "", _cache_headers(response), not_modified=True)
                if response.status_code not in _REDIRECTS:
                    return await _read_body(response, target, policy, kind, what)
                location = response.headers.get("location")
            finally:
                await response.aclose()
            if not location:
                message = f"{hop_what}: HTTP {response.status_code} redirect without a Location"
                raise MediaError(400, "fetch_failed", message)
            try:
                next_url = str(target.join(location))
            except (httpx.InvalidURL, ValueError):
                message = f"{hop_what} redirects to an invalid URL {location!r}"
                raise MediaError(400, "invalid_url", message) from None
            target = netguard.parse_http_url(next_url, f"{what} redirect")
    raise MediaError(400, "too_many_redirects", f"{what}: more than {policy.max_redirects} redirects")


async def _send_pinned(
    client: httpx.AsyncClient, target: httpx.URL, policy: MediaPolicy, what: str,
    validators: dict[str, str] | None = None,
) -> httpx.Response:
    """Connect to a checked address of ``target``'s host, trying each in resolver order."""
    host = target.raw_host.decode("ascii")
    port = target.port or (443 if target.scheme == "https" else 80)
    addresses = await netguard.resolve_and_check(host, port, policy, what=what)
    extensions = {}
    if target.scheme == "https" and netguard.parse_ip_literal(host) is None:
        extensions["sni_hostname"] = host  # SNI and certificate check use the name, not the IP
    failures: list[str] = []
    for address in addresses:
        request = client.build_request(
            "GET", target.copy_with(host=address), headers={"Host": target.netloc.decode("ascii"), **(validators or {})},
            extensions=extensions,
        )
        try:
            return await client.send(request, stream=True)
        except httpx.TimeoutException:
            message = f"{what}: {host} did not answer in time"
            raise MediaError(TIMEOUT_STATUS, "fetch_timeout", message) from None
        except (httpx.ConnectError, httpx.InvalidURL) as exc:
            failures.append(f"{address}: {netguard.describe(exc)}")
        except httpx.HTTPError as exc:
            message = f"{what}: request to {host} failed ({netguard.describe(exc)})"
            raise MediaError(400, "fetch_failed", message) from None
    raise MediaError(400, "fetch_failed", f"{what}: could not connect to {host} ({'; '.join(failures)})")


async def _read_body(
    response: httpx.Response, target: httpx.URL, policy: MediaPolicy, kind: MediaKind | None, what: str
) -> FetchedMedia:
    if not 200 <= response.status_code < 300:
        reason = f" {response.reason_phrase}" if response.reason_phrase else ""
        message = f"{what}: the server answered HTTP {response.status_code}{reason}"
        raise MediaError(400, "upstream_status", message)
    content_type = _media_type(response.headers.get("content-type"))
    declared = response.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise _too_large(what, policy.max_bytes, f" (Content-Length says {int(declared)})")
    body = bytearray()
    sniffed = False
    try:
        async for chunk in response.aiter_raw():
            if len(body) + len(chunk) > policy.max_bytes:
                raise _too_large(what, policy.max_bytes)
            body += chunk
            if not sniffed and len(body) >= SNIFF_BYTES:  # refuse wrong content before downloading it all
                _check_kind(bytes(body[:SNIFF_BYTES]), kind, what, content_type)
                sniffed = True
    except httpx.TimeoutException:
        message = f"{what}: the server sent nothing for {policy.read_timeout:g} s"
        raise MediaError(TIMEOUT_STATUS, "fetch_timeout", message) from None
    except httpx.HTTPError as exc:
        raise MediaError(400, "fetch_failed", f"{what}: download failed ({netguard.describe(exc)})") from None
    found = _check_kind(bytes(body[:SNIFF_BYTES]), kind, what, content_type)
    return FetchedMedia(data=bytes(body), content_type=content_type, final_url=str(target), kind=found,
                        cache_headers=_cache_headers(response))


def _cache_headers(response: httpx.Response) -> dict[str, str]:
    return {name: response.headers[name] for name in CACHE_HEADERS if name in response.headers}
