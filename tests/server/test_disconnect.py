"""A client that hangs up stops its generation within a decode step, streaming or not.

The server learns of the hang-up from the ASGI ``http.disconnect`` message (no polling), cancels
the stream, and the worker checks the flag before every decode step. Measured by counting tokens:
the client watches the server's generated-token counter, hangs up once a few tokens were made, and
the generation may then add at most the step already in flight plus one. The model is the slow,
never-ending checkpoint (``slow_checkpoint``), so one step takes far longer than the test's hang-up.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.server.live import scrape, wait_for
from tests.serving import Process, start_server

GENERATED = "llamavid_generation_tokens_total"
ABORTED = ("llamavid_request_success_total", {"finished_reason": "abort"})
RUNNING = "llamavid_num_requests_running"
MAX_AFTER_HANGUP = 2


@pytest.fixture(scope="module")
def slow_server(slow_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    process = start_server(tmp_path_factory.mktemp("slow-serve"), slow_checkpoint, max_tokens_limit=4000)
    try:
        yield process
    finally:
        process.stop()


def open_request(url: str, path: str, body: dict) -> socket.socket:
    """Send a POST on a raw socket and leave the connection open (the client hangs up by closing it)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def tokens_after_hangup(generated: Callable[[], float], aborted: Callable[[], float],
                        idle: Callable[[], bool], sock: socket.socket) -> float:
    """Hang up once the request has made a few tokens; return how many more it made."""
    start, aborts = generated(), aborted()
    wait_for(lambda: generated() - start >= 5, 60, what="the request to generate a few tokens")
    at_hangup = generated()
    sock.close()
    wait_for(lambda: aborted() > aborts, 30, what="the generation to be aborted")
    wait_for(idle, 30, what="the server to go idle")
    return generated() - at_hangup


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/ask"])
def test_a_hangup_stops_the_generation_within_a_step(slow_server: Process, path: str, stream: bool) -> None:
    url = slow_server.url
    body = ({"messages": [{"role": "user", "content": "Tell me everything."}]} if path.endswith("completions")
            else {"question": "Tell me everything."})
    sock = open_request(url, path, {**body, "max_tokens": 4000, "stream": stream})
    after = tokens_after_hangup(lambda: scrape(url)[GENERATED], lambda: scrape(url)[ABORTED],
                                lambda: scrape(url)[RUNNING] == 0, sock)
    assert after <= MAX_AFTER_HANGUP, f"{after:.0f} tokens were generated after the client hung up"
