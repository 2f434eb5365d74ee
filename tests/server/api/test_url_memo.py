"""A repeated media URL is not downloaded (or hashed) again while its cache headers allow.

A loopback HTTP server (127.0.0.1) counts requests and answers with the cache headers a test
chooses; ``MediaIngest`` runs against the embedded engine's real media store.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from cache.keys import digest_bytes
from server.api.ingest import MediaIngest
from server.engine.storage import DiskMediaStore, MemoryVideoRegistry
from server.fetch.memo import UrlMemo
from server.metrics import LlamaVidMetrics
from server.settings import Settings
from tests.server.cache_host import CacheHost, Resource, cache_host


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def host() -> Iterator[CacheHost]:
    with cache_host() as state:
        yield state


@pytest.fixture
def ingest(tmp_path: Path) -> MediaIngest:
    settings = Settings(allowed_media_hosts=["127.0.0.1"], media_dir=str(tmp_path / "media"))
    engine = SimpleNamespace(media=DiskMediaStore(tmp_path / "media", 1 << 30), registry=MemoryVideoRegistry())
    return MediaIngest(settings, engine, LlamaVidMetrics(process_metrics=False))


def ask_twice(ingest: MediaIngest, url: str) -> tuple[str, str]:
    async def run() -> tuple[str, str]:
        first = await ingest.image_from_url(url, field="image_url")
        second = await ingest.image_from_url(url, field="image_url")
        return first.digest, second.digest
    return asyncio.run(run())


def test_a_fresh_url_is_not_fetched_again(host: CacheHost, ingest: MediaIngest) -> None:
    host.resources["/fresh.png"] = Resource(png((200, 0, 0)), {"Cache-Control": "max-age=600"})
    first, second = ask_twice(ingest, host.url + "/fresh.png")
    assert first == second == digest_bytes(host.resources["/fresh.png"].body)
    assert host.requests("/fresh.png") == [(200, {})]  # the repeat made no request at all


def test_a_stale_url_is_revalidated_and_a_304_keeps_the_digest(host: CacheHost, ingest: MediaIngest) -> None:
    host.resources["/stale.png"] = Resource(png((0, 200, 0)), {"Cache-Control": "no-cache"}, etag='"v1"')
    first, second = ask_twice(ingest, host.url + "/stale.png")
    assert first == second
    assert host.requests("/stale.png") == [(200, {}), (304, {"If-None-Match": '"v1"'})]
    assert host.downloads("/stale.png") == 1


def test_last_modified_alone_revalidates_with_if_modified_since(host: CacheHost, ingest: MediaIngest) -> None:
    stamp = "Tue, 14 Nov 2023 22:13:20 GMT"
    host.resources["/dated.png"] = Resource(png((0, 0, 200)), {"Cache-Control": "max-age=0"}, last_modified=stamp)
    first, second = ask_twice(ingest, host.url + "/dated.png")
    assert first == second
    assert host.requests("/dated.png") == [(200, {}), (304, {"If-Modified-Since": stamp})]


def test_no_store_is_downloaded_every_time(host: CacheHost, ingest: MediaIngest) -> None:
    host.resources["/private.png"] = Resource(png((9, 9, 9)), {"Cache-Control": "no-store, max-age=600"},
                                              etag='"x"')
    ask_twice(ingest, host.url + "/private.png")
    assert host.requests("/private.png") == [(200, {}), (200, {})]  # not even a conditional request


def test_expiry_then_a_changed_resource_gets_its_new_digest(host: CacheHost, ingest: MediaIngest) -> None:
    clock = [1_000.0]
    ingest.url_memo = UrlMemo(16, clock=lambda: clock[0])
    url = host.url + "/changes.png"
    host.resources["/changes.png"] = Resource(png((1, 2, 3)), {"Cache-Control": "max-age=60"}, etag='"a"')

    async def digest() -> str:
        return (await ingest.image_from_url(url, field="image_url")).digest

    old = asyncio.run(digest())
    clock[0] += 59
    assert asyncio.run(digest()) == old and host.downloads("/changes.png") == 1  # still fresh
    clock[0] += 2
    host.resources["/changes.png"] = Resource(png((3, 2, 1)), {"Cache-Control": "max-age=60"}, etag='"b"')
    new = asyncio.run(digest())
    assert new != old and new == digest_bytes(host.resources["/changes.png"].body)
    assert host.requests("/changes.png")[-1] == (200, {"If-None-Match": '"a"'})  # asked, got the new bytes


def test_bytes_gone_from_the_media_store_are_downloaded_again(host: CacheHost, ingest: MediaIngest) -> None:
    host.resources["/evicted.png"] = Resource(png((50, 50, 50)), {"Cache-Control": "max-age=600"}, etag='"e"')
    url = host.url + "/evicted.png"

    async def run() -> None:
        ref = await ingest.image_from_url(url, field="image_url")
        await ingest.engine.media.delete(ref.digest)
        again = await ingest.image_from_url(url, field="image_url")
        assert again.digest == ref.digest and await ingest.engine.media.has(ref.digest)

    asyncio.run(run())
    assert host.requests("/evicted.png") == [(200, {}), (200, {})]  # unconditional: a 304 would not bring them
