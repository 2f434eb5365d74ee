"""A worker dies (SIGKILL) in the middle of an answer: the other worker reclaims the job after the
visibility timeout and replays it, and the client still gets exactly one complete answer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Deployment, start_deployment, wait_for

QUESTION = [{"role": "user", "content": "Describe the whole video in detail, please."}]
MAX_TOKENS = 600  # the tiny model never stops by itself: a long job, seconds on the CPU


@pytest.fixture
def failover(redis_available, tiny_checkpoint: Path, tmp_path: Path) -> Iterator[Deployment]:
    d = start_deployment(tmp_path, tiny_checkpoint, workers=2, visibility_timeout=3)
    try:
        yield d
    finally:
        d.stop()


def test_killed_workers_job_is_finished_by_the_other_worker(failover: Deployment) -> None:
    d = failover
    client = d.openai(timeout=120)
    stream = client.chat.completions.create(
        model="tiny", messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True})
    text, finish, usage, completion_id, victim, text_at_kill = "", None, None, None, None, None
    chunks = 0
    for chunk in stream:
        completion_id = completion_id or chunk.id
        usage = chunk.usage or usage
        if not chunk.choices:
            continue
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
        chunks += 1
        if victim is None and chunks == 10:
            running = [w for w in d.workers if w.metric("llamavid_num_requests_running") == 1]
            assert len(running) == 1, f"expected one worker running the job:\n{d.logs()}"
            victim = running[0]
            victim.process.kill()  # SIGKILL: no goodbye, the job stays pending under its name
            text_at_kill = text
    assert victim is not None, "the stream ended before a worker could be killed"
    assert victim.process.proc.returncode == -9
    survivor = next(w for w in d.workers if w is not victim)

    # The stream completed with one whole answer; no error chunk (the openai client raises on those).
    assert finish == "length", f"finish_reason {finish!r}:\n{d.logs()}"
    assert usage is not None and usage.completion_tokens == MAX_TOKENS
    assert text.startswith(text_at_kill)
    rid = "req-" + completion_id.removeprefix("chatcmpl-")
    attempts = {int(fields[b"attempt"]) for _, fields in d.redis.xrange(d.key("events", rid))}
    assert {1, 2} <= attempts, f"the job was not replayed: attempts {attempts}"
    assert int(d.redis.get(d.key("attempt", rid))) == max(attempts)
    assert "reclaimed questions job" in survivor.process.output()

    # Nothing lost, nothing left: the job was acknowledged and deleted by the survivor.
    questions = d.key("jobs", "questions")
    wait_for(lambda: d.redis.xlen(questions) == 0, 10, "the reclaimed job to be acknowledged")
    assert d.redis.xpending(questions, "workers")["pending"] == 0

    # Greedy decoding is deterministic: a fresh request gives the same text, so no segment was
    # duplicated or dropped when the relay stitched the two attempts together.
    fresh = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=MAX_TOKENS,
                                           temperature=0)
    assert fresh.choices[0].finish_reason == "length"
    assert fresh.choices[0].message.content == text
    served = {json.loads(f[b"event"])["type"] for _, f in d.redis.xrange(d.key("events", rid))}
    assert served >= {"delta", "done"}
