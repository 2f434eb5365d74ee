"""The worker's runner in process, on the tiny model: the scheduler, failures and deadlines.

Every admitted question must end with a ``done`` or an ``error`` event: a decode step that raises
fails exactly the requests it carried (503 for out-of-memory) and frees their blocks; a deadline
that passes while a request waits for its next token ends it with a 408; concurrent first requests
on a fresh runner all finish (the KV cache exists before them); with a KV cache that holds about
two questions, many questions wait for room, are preempted and resumed, and answer exactly what
they answer alone.
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
                       sampling=SamplingParams(max_tokens=max_tokens), arrival_time=now,
                       deadline=now + deadline)


def make_runner(model, tmp_path: Path, num_blocks: int = 256, block_size: int = 16, **kwargs) -> ModelRunner:
    return ModelRunner(model, MemoryFeatureStore(1 << 26), DiskMediaStore(tmp_path / "media", 1 << 26),
                       MemoryVideoRegistry(), LlamaVidMetrics(), num_blocks=num_blocks, block_size=block_size,
                       **{"max_running": 4, **kwargs})


@pytest.fixture
async def runner(tiny_model, tmp_path: Path):
    runner = make_runner(tiny_model, tmp_path)
    await runner.start()
    yield runner
    runner.close()


def all_blocks_free(runner: ModelRunner) -> bool:
    pool = runner.scheduler.decoder.pool
    return pool.free_blocks == pool.usable_blocks and not runner.scheduler.running


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


async def test_the_kv_cache_exists_before_the_first_request(runner: ModelRunner) -> None:
    assert runner.scheduler.decoder is not None and all_blocks_free(runner)


async def test_concurrent_first_requests_all_finish(runner: ModelRunner) -> None:
    results = await asyncio.gather(*(answer(runner, job(f"Question {i}?", max_tokens=12)) for i in range(8)))
    for events in results:
        assert isinstance(final(events), DoneEvent)
    assert all_blocks_free(runner)
    assert runner.metrics.num_requests_running._value.get() == 0


async def test_a_failed_decode_step_fails_every_request_it_carried(runner: ModelRunner, monkeypatch) -> None:
    scheduler = runner.scheduler
    real_step, calls, carried = scheduler.decoder.step, 0, []

    def failing_step(seqs):
        nonlocal calls
        calls += 1
        if calls == 3:
            carried.extend(seqs)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(seqs)

    monkeypatch.setattr(scheduler.decoder, "step", failing_step)
    results = await asyncio.gather(*(answer(runner, job(f"Tell me {i}.", max_tokens=200)) for i in range(4)))
    ends = [final(events) for events in results]
    failed = [e for e in ends if isinstance(e, ErrorEvent)]
    assert len(failed) == len(carried) >= 2, ends
    for error in failed:
        assert (error.status, error.code) == (503, "out_of_memory")
        assert "out of memory" in error.message
    assert all_blocks_free(runner)  # every block of the failed requests is back
    monkeypatch.setattr(scheduler.decoder, "step", real_step)
    assert isinstance(final(await answer(runner, job("Again?", max_tokens=8))), DoneEvent)


async def test_other_step_failures_are_500(runner: ModelRunner, monkeypatch) -> None:
    def broken(seqs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(runner.scheduler.decoder, "step", broken)
    error = final(await answer(runner, job("Hello?", max_tokens=50)))
    if isinstance(error, ErrorEvent):  # unless the first token (from the prefill) already ended it
        assert (error.status, error.code) == (500, "decode_failed") and "device lost" in error.message
    assert all_blocks_free(runner)


async def test_waiting_for_a_token_honours_the_deadline(runner: ModelRunner, monkeypatch) -> None:
    """A decode step that never returns: the request ends with 408 at its deadline, not never."""
    stuck = asyncio.Event()

    async def never() -> None:
        stuck.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(runner.scheduler, "_step", never)
    events = await answer(runner, job("Anything?", max_tokens=50, deadline=1.0))
    error = final(events)
    assert stuck.is_set() and isinstance(error, ErrorEvent)
    assert (error.status, error.code) == (408, "timeout") and "deadline" in error.message


async def test_a_question_that_can_never_fit_the_cache_is_a_400(tiny_model, tmp_path: Path) -> None:
    runner = make_runner(tiny_model, tmp_path, num_blocks=5, block_size=16)  # 64 positions
    await runner.start()
    try:
        error = final(await answer(runner, job("Tell me a long story.", max_tokens=200)))
        assert (isinstance(error, ErrorEvent)
                and (error.status, error.code) == (400, "context_length_exceeded"))
        assert "positions" in error.message and "holds 64" in error.message
    finally:
        runner.close()


async def test_a_cache_for_two_questions_answers_many_exactly(tiny_model, tmp_path: Path) -> None:
    """Eight questions, a KV cache that holds about two: they wait for room (or are preempted to
    host memory and resumed), nothing fails, the cache is never over-full, and every answer is
    the answer the question gets alone."""
    alone = make_runner(tiny_model, tmp_path / "alone", max_running=1)
    await alone.start()
    questions = [job(f"Question number {i} is here?", max_tokens=100 + 10 * i) for i in range(8)]
    try:
        expected = [await answer(alone, q) for q in questions]
    finally:
        alone.close()
    # 400 positions
    small = make_runner(tiny_model, tmp_path / "small", num_blocks=26, block_size=16, max_running=8)
    await small.start()
    usage, sampling = [], True

    async def watch() -> None:
        while sampling:
            usage.append(small.scheduler.decoder.pool.usage())
            await asyncio.sleep(0)

    watcher = asyncio.ensure_future(watch())
    try:
        got = await asyncio.gather(*(answer(small, q) for q in questions))
    finally:
        sampling = False
        await watcher
        small.close()
    for mine, theirs in zip(got, expected):
        assert isinstance(final(mine), DoneEvent)
        assert ([e.text for e in mine if isinstance(e, DeltaEvent)]
                == [e.text for e in theirs if isinstance(e, DeltaEvent)])
    assert max(usage) <= 1.0 and max(usage) > 0.5  # it was used, and never past full
    assert small.metrics.num_preemptions._value.get() >= 1  # some were swapped out and back in
    assert all_blocks_free(small)


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
    for _ in range(100):  # the scheduler frees a cancelled request's blocks on its next turn
        if all_blocks_free(runner):
            break
        await asyncio.sleep(0.01)
    assert all_blocks_free(runner)


async def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(tiny_model, tmp_path: Path,
                                                                         monkeypatch) -> None:
    """With 16-position chunks, a long prompt takes several forwards, and a request already decoding
    gets a step between every two of them instead of waiting for the whole prompt."""
    runner = make_runner(tiny_model, tmp_path, prefill_chunk=16)
    await runner.start()
    calls: list[str] = []
    decoder = runner.scheduler.decoder
    real_prefill, real_step = decoder.prefill, decoder.step
    monkeypatch.setattr(decoder, "prefill",
                        lambda seq: calls.append(f"prefill {seq.prompt_len}") or real_prefill(seq))
    monkeypatch.setattr(decoder, "step", lambda seqs: calls.append(f"step {len(seqs)}") or real_step(seqs))
    try:
        first = asyncio.ensure_future(answer(runner, job("Short?", max_tokens=60)))
        while not runner.scheduler.running:
            await asyncio.sleep(0.001)
        long_question = "Describe every little thing that happens in this long story, " * 3
        second = await answer(runner, job(long_question, max_tokens=4))
        await first
    finally:
        runner.close()
    assert isinstance(final(second), DoneEvent)
    longest = max(int(call.split()[1]) for call in calls if call.startswith("prefill"))
    long_chunks = [i for i, call in enumerate(calls) if call == f"prefill {longest}"]
    assert len(long_chunks) == -(-longest // 16) >= 5  # the long prompt took several chunks
    between = [calls[a + 1 : b] for a, b in zip(long_chunks, long_chunks[1:])]
    assert all(any(c.startswith("step") for c in gap) for gap in between), calls


async def test_a_backend_outage_mid_question_is_a_clean_503(tiny_model, tmp_path: Path) -> None:
    """The records' backend is unreachable while a video question looks up its extraction: the client
    gets a 503 naming the backend, not an internal error."""
    from server.engine.jobs import MediaRef, Sampling
    from server.engine.protocol import EngineUnavailable

    class Unreachable(MemoryVideoRegistry):
        async def claim(self, video_id: str, stale_after: float) -> bool:
            raise EngineUnavailable("the queue backend (Redis) is unreachable: refused",
                                    code="redis_unavailable")

    runner = ModelRunner(tiny_model, MemoryFeatureStore(1 << 26), DiskMediaStore(tmp_path / "media", 1 << 26),
                         Unreachable(), LlamaVidMetrics(), num_blocks=64)
    await runner.start()
    try:
        question = job("What happens?").model_copy(update={"media": [MediaRef(
            kind="video", digest="ab" * 32, video_id="vid-" + "0" * 24, sampling=Sampling())]})
        error = final(await answer(runner, question))
    finally:
        runner.close()
    assert isinstance(error, ErrorEvent) and (error.status, error.code) == (503, "redis_unavailable")
