"""URL -> content digest, remembered as an HTTP cache would remember the response (RFC 9111).

A video given by URL used to be downloaded and hashed on every request before the feature cache
could hit. The memo keeps, per URL, the digest of what was downloaded and the response's
validators, so that a repeat

* while the response is fresh (``Cache-Control: max-age`` / ``s-maxage``, else ``Expires`` - ``Date``,
  less ``Age``) is not fetched at all;
* once it is stale, or when the response said ``no-cache`` (or gave no freshness), is a
  conditional GET (``If-None-Match`` / ``If-Modified-Since``); a 304 keeps the digest and refreshes
  the entry;
* of a response marked ``no-store`` is never remembered.

Only the digest is kept: the bytes are in the media store, and the caller uses an entry only while
the store still holds them. Bounded (least recently used forgotten first); plain library code.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

_DIRECTIVE = re.compile(r"\s*([!#$%&'*+\-.^_`|~0-9A-Za-z]+)\s*(?:=\s*(\"[^\"]*\"|[^,]*))?\s*(?:,|$)")


@dataclass(frozen=True)
class MemoEntry:
    digest: str
    fresh_until: float  # unix time; at or before it the entry may be used without asking the origin
    headers: tuple[tuple[str, str], ...] = ()  # the stored response's cache headers

    @property
    def etag(self) -> str | None:
        return dict(self.headers).get("etag")

    @property
    def last_modified(self) -> str | None:
        return dict(self.headers).get("last-modified")

    def fresh(self, now: float) -> bool:
        return now < self.fresh_until

    def validators(self) -> dict[str, str]:
        """The conditional-request headers that revalidate the entry (empty: it cannot be revalidated)."""
        out = {}
        if self.etag:
            out["If-None-Match"] = self.etag
        if self.last_modified:
            out["If-Modified-Since"] = self.last_modified
        return out


def cache_control(value: str | None) -> dict[str, str | None]:
    """``Cache-Control`` directives by lower-case name (value unquoted, None for a bare directive)."""
    out: dict[str, str | None] = {}
    for match in _DIRECTIVE.finditer(value or ""):
        if match.group(1):
            raw = match.group(2)
            out.setdefault(match.group(1).lower(), raw.strip().strip('"') if raw is not None else None)
    return out


def _http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _seconds(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def freshness_lifetime(headers: dict[str, str], now: float) -> float | None:
    """How many more seconds the response stays fresh; None: do not store it (``no-store``).

    ``no-cache``, an invalid or missing lifetime and an ``Expires`` in the past all give 0: stored,
    but revalidated before every use. No heuristic freshness: a URL that says nothing is asked again.
    """
    directives = cache_control(headers.get("cache-control"))
    if "no-store" in directives:
        return None
    if "no-cache" in directives:
        return 0.0
    age = _seconds(headers.get("age")) or 0
    for name in ("s-maxage", "max-age"):  # the memo is shared by every client of the server
        if name in directives:
            lifetime = _seconds(directives[name])
            return max(0.0, float(lifetime - age)) if lifetime is not None else 0.0
    expires = _http_date(headers.get("expires"))
    if expires is None:
        return 0.0
    date = _http_date(headers.get("date")) or now
    return max(0.0, expires - date - age)


class UrlMemo:
    """At most ``size`` URLs (0: remember nothing), each with the digest of its last response."""

    def __init__(self, size: int, clock=time.time) -> None:
        self.size = size
        self._clock = clock
        self._entries: OrderedDict[str, MemoEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def now(self) -> float:
        return self._clock()

    def get(self, url: str) -> MemoEntry | None:
        entry = self._entries.get(url)
        if entry is not None:
            self._entries.move_to_end(url)
        return entry

    def forget(self, url: str) -> None:
        self._entries.pop(url, None)

    def remember(self, url: str, digest: str, headers: dict[str, str]) -> MemoEntry | None:
        """Keep ``digest`` for ``url`` as the response's headers allow (None: they forbid it, or the
        entry could never be used: not fresh and nothing to revalidate it with)."""
        now = self._clock()
        lifetime = freshness_lifetime(headers, now)
        entry = None
        if lifetime is not None and self.size > 0:
            entry = MemoEntry(digest, now + lifetime, tuple(sorted(headers.items())))
            if not entry.fresh(now) and not entry.validators():
                entry = None
        if entry is None:
            self.forget(url)
            return None
        self._entries[url] = entry
        self._entries.move_to_end(url)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return entry

    def revalidated(self, url: str, entry: MemoEntry, headers: dict[str, str]) -> MemoEntry | None:
        """A 304 confirmed ``entry``: the 304's headers update the stored ones (RFC 9111 §4.3.4),
        and the freshness starts again from its ``Date`` and ``Age``."""
        stored = {k: v for k, v in entry.headers if k not in ("date", "age")}
        return self.remember(url, entry.digest, {**stored, **headers})
