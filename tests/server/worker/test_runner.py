"""The worker's runner in process, on the tiny model: failures and deadlines keep their promises.

Every admitted question must end with a ``done`` or an ``error`` event: a decode step that raises
fails exactly the requests it carried (503 for out-of-memory), frees their slots and leaves a
working batch; a deadline that passes while a request waits for its next token ends it with a
408; concurrent first requests on a fresh runner all finish (the batch exists before them).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch

from cache import MemoryFeatureStore
from server.engine.events import AnyEvent, DeltaEvent, DoneEvent, ErrorEvent
from server.engine.jobs import QuestionJob, SamplingParams, Turn
from server.engine.storage import DiskMediaStore, MemoryVideoRegistry
from server.metrics import LlamaVidMetrics
from server.worker.runner import ModelRunner


def job(question: str = "What happens?", max_tokens: int = 40, deadline: float = 60.0) -> QuestionJob:
    now = time.time()
    return QuestionJob(request_id=f"req-{question}", messages=[Turn(role="user", content=question)],
                       sampling=SamplingParams(max_tokens=max_tokens), arrival_time=now, deadline=now + deadline)


@pytest.fixture
async def runner(tiny_model, tmp_path: Path):
    metrics = LlamaVidMetrics()
    runner = ModelRunner(tiny_model, MemoryFeatureStore(1 << 26), DiskMediaStore(tmp_path / "media", 1 << 26),
                         MemoryVideoRegistry(), metrics, max_running=4, batch_capacity=1024)
    await runner.start()
    yield runner
    runner.close()


async def answer(runner: ModelRunner, q: QuestionJob, cancelled=lambda: False) -> list[AnyEvent]:
    events: list[AnyEvent] = []

    async def emit(event: AnyEvent) -> None:
        events.append(event)

    await runner.answer(q, emit, cancelled)
    return events


def final(events: list[AnyEvent]) -> AnyEvent:
    ends = [e for e in events if isinstance(e, (DoneEvent, ErrorEvent))]
    assert len(ends) == 1 and ends[0] is events[-1], f"not exactly one final event, last: {events[-3:]}"
    return ends[0]


async def test_the_batch_exists_before_the_first_request(runner: ModelRunner) -> None:
    assert runner.decoding.batch is not None and runner.decoding.batch.active == 0


async def test_concurrent_first_requests_all_finish(runner: ModelRunner) -> None:
    results = await asyncio.gather(*(answer(runner, job(f"Question {i}?", max_tokens=12)) for i in range(8)))
    for events in results:
        assert isinstance(final(events), DoneEvent)
    assert runner.decoding.batch.active == 0
    assert runner.metrics.num_requests_running._value.get() == 0


async def test_a_failed_decode_step_fails_every_request_it_carried(runner: ModelRunner, monkeypatch) -> None:
    batch = runner.decoding.batch
    real_step, calls, carried = batch.step, 0, []

    def failing_step():
        nonlocal calls
        calls += 1
        if calls == 3:
            carried.extend(slot.request for slot in batch.slots)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step()

    monkeypatch.setattr(batch, "step", failing_step)
    results = await asyncio.gather(*(answer(runner, job(f"Tell me {i}.", max_tokens=200)) for i in range(4)))
    ends = [final(events) for events in results]
    failed = [e for e in ends if isinstance(e, ErrorEvent)]
    assert len(failed) == len(carried) >= 2, ends
    for error in failed:
        assert (error.status, error.code) == (503, "out_of_memory")
        assert "out of memory" in error.message
    assert batch.active == 0 and runner._running._value == 4  # every slot and running permit is back
    monkeypatch.setattr(batch, "step", real_step)
    assert isinstance(final(await answer(runner, job("Again?", max_tokens=8))), DoneEvent)


async def test_other_step_failures_are_500(runner: ModelRunner, monkeypatch) -> None:
    batch = runner.decoding.batch
    monkeypatch.setattr(batch, "step", lambda: (_ for _ in ()).throw(RuntimeError("device lost")))
    error = final(await answer(runner, job("Hello?", max_tokens=50)))
    if isinstance(error, ErrorEvent):  # unless the first token (from the prefill) already ended it
        assert (error.status, error.code) == (500, "decode_failed") and "device lost" in error.message
    assert batch.active == 0


async def test_waiting_for_a_token_honours_the_deadline(runner: ModelRunner, monkeypatch) -> None:
    """A decode step that never returns: the request ends with 408 at its deadline, not never."""
    batch = runner.decoding.batch
    stuck = asyncio.Event()

    async def never(*_args):
        stuck.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(runner.decoding, "_run", never)
    events = await answer(runner, job("Anything?", max_tokens=50, deadline=1.0))
    error = final(events)
    assert stuck.is_set() and isinstance(error, ErrorEvent)
    assert (error.status, error.code) == (408, "timeout") and "deadline" in error.message
    assert batch.active == 0  # the slot was given back


async def test_cancellation_stops_before_the_next_token(runner: ModelRunner) -> None:
    tokens = 0

    def cancelled() -> bool:
        return tokens >= 3

    events: list[AnyEvent] = []

    async def emit(event: AnyEvent) -> None:
        nonlocal tokens
        events.append(event)
        tokens += isinstance(event, DeltaEvent)

    generated = runner.metrics.generation_tokens._value.get()
    await runner.answer(job("Go on.", max_tokens=300), emit, cancelled)
    assert not any(isinstance(e, (DoneEvent, ErrorEvent)) for e in events)
    assert runner.metrics.generation_tokens._value.get() - generated < 300
    assert runner.decoding.batch.active == 0
