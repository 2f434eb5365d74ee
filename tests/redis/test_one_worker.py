"""One worker: the question queue's bound (429), a live worker's long job never reclaimed, and the
absence of workers (503)."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Barrier, Event, Lock

import httpx
import pytest

from .conftest import Deployment, start_deployment, wait_for

QUESTION = [{"role": "user", "content": "Tell me everything."}]


@pytest.fixture(scope="module")
def deployments(redis_available, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[Deployment, Deployment]]:
    """Started together: one API with one worker (see ``one_worker``) and an API that never had any."""
    tmp = tmp_path_factory.mktemp("one-worker")
    started: list[Deployment] = []
    try:
        started.append(start_deployment(tmp, tiny_checkpoint, workers=1, queue_size=1, max_running=1,
                                        visibility_timeout=1, wait=False))
        started.append(start_deployment(tmp, tiny_checkpoint, workers=0, wait=False))
        for d in started:
            d.wait_started()
        yield started[0], started[1]
    finally:
        for d in started:
            d.stop()


@pytest.fixture
def one_worker(deployments: tuple[Deployment, Deployment]) -> Deployment:
    """One worker, one question running at a time and one waiting: two admitted, then 429. Its
    visibility timeout (1 s) is shorter than the 2 s heartbeat."""
    return deployments[0]


@pytest.fixture
def api_only(deployments: tuple[Deployment, Deployment]) -> Deployment:
    return deployments[1]


def test_queue_bound_answers_429(one_worker: Deployment) -> None:
    d = one_worker
    n = 16
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 1500, "temperature": 0, "stream": True}
    barrier = Barrier(n)
    refusals, lock, all_refused = [0], Lock(), Event()
    timeline: list[tuple[float, int, int]] = []  # (seconds since the burst, request, status)

    def ask(i: int) -> tuple[int, dict | None, str | None]:
        barrier.wait()  # all at once: admission must not let a burst past the bound
        start = time.monotonic()
        with httpx.stream("POST", d.url + "/v1/chat/completions", json=body, timeout=60) as reply:
            timeline.append((round(time.monotonic() - start, 3), i, reply.status_code))
            if reply.status_code != 200:
                reply.read()
                with lock:
                    refusals[0] += 1
                    if refusals[0] == n - 2:
                        all_refused.set()
                return reply.status_code, reply.json(), reply.headers.get("retry-after")
            lines = reply.iter_lines()  # kept referenced: a dropped iterator closes the connection
            for line in lines:  # admitted: the answer has started
                if line.startswith("data:"):
                    break
            # Hang up (which cancels the job) only once the others were refused, so that no
            # late request finds room left by a cancelled one.
            all_refused.wait(timeout=max(0.0, burst + 10 - time.monotonic()))
            lines.close()
            return 200, None, None

    burst = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(ask, range(n)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200, 200] + [429] * (n - 2), f"{results}\n{sorted(timeline)}\n{d.logs()}"
    for status, error, retry_after in results:
        if status == 429:
            assert error["error"]["code"] == "queue_full" and error["error"]["type"] == "rate_limit_error"
            assert retry_after is not None and int(retry_after) > 0
    # The admitted ones were cancelled when their clients hung up; the worker goes idle.
    wait_for(lambda: d.total("llamavid_num_requests_running") == 0, 20, "the worker to go idle")
    wait_for(lambda: d.redis.xlen(d.key("jobs", "questions")) == 0, 20, "the queue to drain")
    assert d.total("llamavid_request_success_total", finished_reason="abort") == 2


def test_live_workers_long_job_is_not_reclaimed(one_worker: Deployment) -> None:
    """A job running longer than the visibility timeout is kept fresh by its worker: nobody, the
    worker itself included, takes it over and runs it a second time.

    Asserted on the mechanism, not on time: while the job runs, its pending entry is sampled; its
    idle time must keep dropping back (the heartbeat refreshed it, often enough to span more than
    a visibility timeout) and never reach the visibility timeout (1 s here)."""
    d = one_worker
    answered = d.total("llamavid_request_success_total")
    stream = d.key("jobs", "questions")
    idle: list[int] = []
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(lambda: d.openai(timeout=60).chat.completions.create(
            model="tiny", messages=QUESTION, max_tokens=1900, temperature=0))
        while not running.done():
            for entry in d.redis.xpending_range(stream, "workers", "-", "+", 10):
                assert entry["times_delivered"] == 1, f"the job was delivered again: {entry}"
                idle.append(entry["time_since_delivered"])
            time.sleep(0.02)
        reply = running.result()
    refreshes = sum(later < earlier for earlier, later in zip(idle, idle[1:]))
    heartbeat_ms = 1000 / 3  # the worker refreshes its jobs every visibility_timeout / 3
    assert refreshes * heartbeat_ms > 1000, f"the job did not outlive the visibility timeout: idle samples {idle}"
    assert max(idle) < 1000, f"the running job's entry went idle for the visibility timeout: {max(idle)} ms"
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 1900
    rid = "req-" + reply.id.removeprefix("chatcmpl-")
    attempts = {int(f[b"attempt"]) for _, f in d.redis.xrange(d.key("events", rid))}
    assert attempts == {1}, f"a live worker's job was reclaimed and run again: attempts {attempts}"
    assert int(d.redis.get(d.key("attempt", rid))) == 1
    wait_for(lambda: d.total("llamavid_num_requests_running") == 0, 10, "the worker to go idle")
    assert d.total("llamavid_request_success_total") == answered + 1
    assert "reclaimed" not in d.workers[0].process.output()


def test_no_worker_left_answers_503(one_worker: Deployment) -> None:
    """The workers are gone (here: stopped cleanly, so their cards vanish at once)."""
    d = one_worker
    for worker in d.workers:
        worker.process.stop(signal.SIGTERM)
        assert worker.process.proc.returncode == 0, worker.process.output()[-3000:]
    assert d.worker_cards() == []
    reply = httpx.get(d.url + "/ready", timeout=10)
    assert reply.status_code == 503
    assert reply.json()["model"] is False and reply.json()["cache"] is True
    _assert_no_worker_error(d)


def test_no_worker_ever_answers_503(api_only: Deployment) -> None:
    d = api_only
    wait_for(lambda: httpx.get(d.url + "/ready", timeout=10).status_code == 503, 10, "/ready to answer")
    reply = httpx.get(d.url + "/ready", timeout=10)
    assert reply.json()["model"] is False and reply.json()["cache"] is True
    _assert_no_worker_error(d)


def _assert_no_worker_error(d: Deployment) -> None:
    for path, body in (("/v1/chat/completions", {"model": "tiny", "messages": QUESTION, "max_tokens": 4}),
                       ("/v1/ask", {"question": "Anyone?", "max_tokens": 4})):
        reply = httpx.post(d.url + path, json=body, timeout=10)
        assert reply.status_code == 503, reply.text
        assert reply.headers["content-type"].startswith("application/json")
        error = json.loads(reply.text)["error"]
        assert error["code"] == "no_worker", error
        assert "worker" in error["message"]
        assert int(reply.headers["retry-after"]) > 0
    assert d.redis.xlen(d.key("jobs", "questions")) == 0, "a question was queued with nobody to answer it"
