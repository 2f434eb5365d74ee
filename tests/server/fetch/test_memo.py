"""The URL memo's reading of cache headers (RFC 9111 freshness) and its bound."""

from __future__ import annotations

import pytest

from server.fetch.memo import UrlMemo, cache_control, freshness_lifetime

NOW = 1_700_000_000.0
DATE = "Tue, 14 Nov 2023 22:13:20 GMT"  # NOW
IN_AN_HOUR = "Tue, 14 Nov 2023 23:13:20 GMT"


def test_cache_control_directives() -> None:
    assert cache_control('public, Max-Age=60, no-cache="set-cookie"') == {
        "public": None, "max-age": "60", "no-cache": "set-cookie"}
    assert cache_control(None) == {}


@pytest.mark.parametrize(("headers", "lifetime"), [
    ({"cache-control": "no-store"}, None),
    ({"cache-control": "max-age=60, no-store"}, None),
    ({"cache-control": "no-cache, max-age=60"}, 0.0),
    ({"cache-control": "max-age=60"}, 60.0),
    ({"cache-control": "max-age=60", "age": "50"}, 10.0),
    ({"cache-control": "max-age=60", "age": "70"}, 0.0),
    ({"cache-control": "max-age=60, s-maxage=5"}, 5.0),  # the memo is a shared cache
    ({"cache-control": "max-age=soon"}, 0.0),
    ({"expires": IN_AN_HOUR, "date": DATE}, 3600.0),
    ({"expires": IN_AN_HOUR, "date": DATE, "cache-control": "max-age=5"}, 5.0),  # max-age wins
    ({"expires": "0", "date": DATE}, 0.0),  # invalid: already expired
    ({}, 0.0),  # nothing said: revalidate (no heuristic freshness)
])
def test_freshness_lifetime(headers: dict, lifetime: float | None) -> None:
    assert freshness_lifetime(headers, NOW) == lifetime


def test_what_is_remembered_and_for_how_long() -> None:
    clock = [NOW]
    memo = UrlMemo(2, clock=lambda: clock[0])
    assert memo.remember("a", "d1", {"cache-control": "no-store", "etag": '"x"'}) is None
    assert memo.remember("a", "d1", {}) is None  # neither fresh nor revalidatable: no use
    entry = memo.remember("a", "d1", {"cache-control": "max-age=10"})
    assert entry.fresh(NOW) and not entry.fresh(NOW + 10) and entry.validators() == {}
    stale = memo.remember("b", "d2", {"cache-control": "no-cache", "etag": '"v2"', "last-modified": DATE})
    assert not stale.fresh(NOW) and stale.validators() == {"If-None-Match": '"v2"', "If-Modified-Since": DATE}
    # a 304 updates the stored headers: fresh again for its max-age, validators kept
    clock[0] = NOW + 100
    again = memo.revalidated("b", stale, {"cache-control": "max-age=30"})
    assert again.digest == "d2" and again.fresh(NOW + 129) and not again.fresh(NOW + 130)
    assert again.validators()["If-None-Match"] == '"v2"'
    # bounded: the least recently used goes first
    memo.get("a")
    memo.remember("c", "d3", {"cache-control": "max-age=10"})
    assert len(memo) == 2 and memo.get("b") is None and memo.get("a") is not None
    # a later no-store response forgets what the URL had
    memo.remember("a", "d4", {"cache-control": "no-store"})
    assert memo.get("a") is None
    assert UrlMemo(0).remember("a", "d", {"cache-control": "max-age=60"}) is None  # size 0: off
