"""Fault injection against real processes: nothing stuck, nothing lost.

Every deployment here runs on a private ``redis-server`` (its own port, no persistence) that a
test may kill and restart, with ``llamavid api`` and ``llamavid worker`` subprocesses a test may
SIGKILL or SIGTERM at chosen points. After each fault the invariants are checked:

* every client request ends, with ``[DONE]`` or an error event, within a bound (never "hung");
* what a client received is the fault-free answer or a prefix of it (nothing duplicated or mixed);
* the gauges of the live workers return to zero and no job stays pending in Redis.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import httpx

from tests.redis.conftest import Deployment, make_video, private_redis, redis_available, wait_for  # noqa: F401

# make_video, private_redis and redis_available are fixtures, shared with tests/redis.

QUESTION = [{"role": "user", "content": "Tell me everything."}]


@dataclass
class Outcome:
    text: str = ""
    end: Literal["done", "error", "hung", "hung_up"] = "hung"  # hung_up: the client left on purpose
    error: dict | None = None
    finish_reason: str | None = None


def stream_answer(url: str, body: dict, *, timeout: float = 60.0,
                  on_text: Callable[[str], bool | None] | None = None) -> Outcome:
    """Stream a chat completion; "hung" if neither ``[DONE]`` nor an error arrives within ``timeout``
    of the last byte. ``on_text`` sees the text so far after every chunk; returning True hangs up."""
    out = Outcome()
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=httpx.Timeout(timeout, connect=5)) as reply:
            if reply.status_code != 200:
                reply.read()
                out.end, out.error = "error", reply.json()["error"]
                return out
            for line in reply.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    out.end = "error" if out.error else "done"
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out.error = chunk["error"]
                for choice in chunk.get("choices") or []:
                    out.text += choice["delta"].get("content") or ""
                    out.finish_reason = choice.get("finish_reason") or out.finish_reason
                if on_text is not None and on_text(out.text):
                    out.end = "hung_up"
                    break
    except (httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.ReadError):
        pass  # "hung", or cut off without an ending: both break the invariant
    return out


def assert_settled(d: Deployment, timeout: float = 30.0) -> None:
    """The live workers hold no request and Redis holds no job that is still pending."""
    def idle() -> bool:
        gauges = sum(d.total(name)
                     for name in ("llamavid_num_requests_running", "llamavid_num_requests_waiting"))
        pending = [d.redis.xpending(stream, "workers")["pending"]
                   for queue in ("questions", "videos") for stream in d.job_streams(queue)
                   if d.redis.exists(stream)]
        return gauges == 0 and not any(pending)
    wait_for(idle, timeout, "the workers to go idle and no job to stay pending")


def reference(d: Deployment, max_tokens: int) -> str:
    """The fault-free greedy answer to ``QUESTION``."""
    reply = httpx.post(d.url + "/v1/chat/completions", timeout=120,
                       json={"messages": QUESTION, "max_tokens": max_tokens, "temperature": 0})
    reply.raise_for_status()
    return reply.json()["choices"][0]["message"]["content"]
