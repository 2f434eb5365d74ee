"""Helpers for tests against a running ``llamavid serve``: metrics, SSE, errors, waiting.

Everything here talks HTTP to the server; nothing imports the server's code.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Scrape:
    """One ``/metrics`` scrape: ``scrape["name", {"label": "v"}]`` or ``scrape["name"]``."""

    samples: dict[tuple[str, frozenset], float]

    def __getitem__(self, key: str | tuple[str, dict]) -> float:
        name, labels = (key, {}) if isinstance(key, str) else key
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def delta(self, later: Scrape, key: str | tuple[str, dict]) -> float:
        return later[key] - self[key]


def scrape(url: str) -> Scrape:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(samples)


def wait_for(check: Callable[[], object], timeout: float = 10.0, interval: float = 0.05,
             what: str = "condition"):
    """Poll ``check`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_idle(url: str, timeout: float = 30.0) -> Scrape:
    """Wait until no question or video job is in flight; return the idle scrape."""
    def idle():
        s = scrape(url)
        busy = [s["llamavid_queue_depth", {"queue": q}] for q in ("videos", "questions")]
        busy += [s["llamavid_num_requests_running"], s["llamavid_num_requests_waiting"]]
        return s if not any(busy) else None
    return wait_for(idle, timeout, what="the server to go idle")


def wait_ready_video(client: httpx.Client, video_id: str, timeout: float = 60.0) -> dict:
    def ready():
        body = client.get(f"/v1/videos/{video_id}").json()
        assert body["status"] != "failed", body
        return body if body["status"] == "ready" else None
    return wait_for(ready, timeout, what=f"video {video_id} to be ready")


def sse_events(raw: str) -> list[tuple[str, str]]:
    """(event name or "message", data) for each SSE event of a whole response body."""
    events = []
    for block in raw.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if data:
            events.append((name, "\n".join(data)))
    return events


def assert_api_error(response: httpx.Response, status: int, *words: str, code: str | None = None) -> dict:
    """A JSON ``{"error": {"message", "type", "code"}}`` with ``status`` whose message names the problem."""
    got = response.status_code
    assert got == status, f"expected {status}, got {got}: {response.text[:500]}"
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert {"message", "type", "code"} <= error.keys(), error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert isinstance(error["code"], str) and error["code"], error
    if code is not None:
        assert error["code"] == code, error
    for word in words:
        assert word.lower() in error["message"].lower(), f"{word!r} not in {error['message']!r}"
    return error

