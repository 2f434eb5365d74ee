"""Where a request's tokens come from: one scheduler over the paged KV cache.

``Scheduler`` owns the process's ``PagedDecoder``, built at warm-up (before the service reports
ready, so concurrent first requests cannot race to create it), and runs one loop:

* admit waiting requests while fewer than ``max_running`` run and the blocks of their prompt (plus
  one block for each running request to grow into) are free; a preempted request comes first;
* prefill one chunk of the oldest admitted prompt, then step every running request together, and
  again: a long prompt never stalls the others for more than one chunk;
* when a step needs blocks that are not free, preempt the newest running sequence: its keys and
  values move to host memory and it waits at the head of the queue, to resume exactly where it was.

A request for ``n`` answers is one sequence until its prompt is in, then ``n`` (``PagedDecoder``
forks them); the queues hold sequences, so each answer runs, ends or is preempted on its own.

A request whose prompt and budget can never fit the cache fails at once, naming the numbers. A
forward that raises (an out-of-memory error, say) fails exactly the requests it carried, frees their
blocks and leaves the rest running. All decoder work runs on the model thread; the bookkeeping
between forwards runs in the loop, when no forward is in flight.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import torch

from model.batching import PagedDecoder, Sampled, Sequence
from model.generate import GenerationParams
from model.llama_vid import LlamaVid, PreparedPrompt

from ..metrics import LlamaVidMetrics
from .model_thread import ModelThread

log = logging.getLogger(__name__)


class DecodeFailure(Exception):
    """Generation failed, or cannot happen; ``status`` is what the client's error event carries."""

    def __init__(self, status: int, code: str, message: str, *, out_of_memory: bool = False) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.out_of_memory = status, code, message, out_of_memory

    @classmethod
    def from_exception(cls, cause: BaseException) -> DecodeFailure:
        if isinstance(cause, torch.cuda.OutOfMemoryError):
            return cls(503, "out_of_memory", "the GPU ran out of memory while generating; retry, or ask "
                       "with fewer frames or max_tokens", out_of_memory=True)
        return cls(500, "decode_failed", f"generation failed: {type(cause).__name__}: {cause}")


class Tokens:
    """One request's place in the scheduler: wait for admission, then read its tokens one by one
    (each ``Sampled`` says which of the request's answers it belongs to)."""

    def __init__(self, scheduler: Scheduler, prepared: PreparedPrompt, params: GenerationParams) -> None:
        self.scheduler = scheduler
        self.seq: Sequence = scheduler.decoder.sequence(self, prepared.inputs_embeds, params,
                                                        prompt_ids=prepared.input_ids)
        self._admitted = asyncio.Event()
        self._queue: asyncio.Queue[Sampled | DecodeFailure] = asyncio.Queue()
        self.closed = False
        self.ended: set[int] = set()  # answers the caller finished (a stop string): their sequences go

    def admit(self) -> None:
        self._admitted.set()

    def deliver(self, sampled: Sampled) -> None:
        self._queue.put_nowait(sampled)

    def fail(self, failure: DecodeFailure) -> None:
        self._admitted.set()
        self._queue.put_nowait(failure)

    async def admitted(self) -> None:
        """Return once the request holds room in the KV cache (or has failed: ``next`` raises then)."""
        await self._admitted.wait()

    async def next(self) -> Sampled:
        item = await self._queue.get()
        if isinstance(item, DecodeFailure):
            raise item
        return item

    def end(self, index: int) -> None:
        """The caller needs no more tokens of answer ``index``."""
        self.ended.add(index)
        self.scheduler.wake()

    async def close(self) -> None:
        self.closed = True
        self.scheduler.wake()

    def gone(self, seq: Sequence) -> bool:
        return self.closed or seq.index in self.ended


class Scheduler:
    def __init__(self, model: LlamaVid, thread: ModelThread, metrics: LlamaVidMetrics, *, num_blocks: int,
                 block_size: int, prefill_chunk: int, max_running: int) -> None:
        self.model = model
        self.thread = thread
        self.metrics = metrics
        self.num_blocks, self.block_size, self.prefill_chunk = num_blocks, block_size, prefill_chunk
        self.max_running = max_running
        self.decoder: PagedDecoder | None = None
        self.waiting: deque[Sequence] = deque()
        self.prefilling: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._wake = asyncio.Event()
        self._loop: asyncio.Task | None = None

    async def start(self) -> None:
        self.decoder = await self.thread(lambda: self.model.paged_decoder(
            self.num_blocks, block_size=self.block_size, prefill_chunk=self.prefill_chunk))
        self._loop = asyncio.ensure_future(self._run())
        self._report()

    def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()

    def wake(self) -> None:
        self._wake.set()

    @property
    def positions(self) -> int:
        """Positions the KV cache holds (what a single request can use at most)."""
        return (self.num_blocks - 1) * self.block_size

    def open(self, prepared: PreparedPrompt, params: GenerationParams) -> Tokens:
        """A request's tokens; raises ``ValueError`` for a grammar that cannot be compiled."""
        assert self.decoder is not None, "start() the scheduler first"
        tokens = Tokens(self, prepared, params)
        if not self.decoder.fits_ever(tokens.seq):
            need = tokens.seq.positions_needed
            answers = f" for each of n={params.n} answers" if params.n > 1 else ""
            tokens.fail(DecodeFailure(400, "context_length_exceeded", (
                f"this question needs {need} positions{answers} ({tokens.seq.prompt_len} of prompt and "
                f"max_tokens {params.max_new_tokens}); this server's KV cache holds {self.positions}: ask "
                "with fewer frames, a smaller max_tokens or a smaller n")))
        else:
            self.waiting.append(tokens.seq)
            self.wake()
        return tokens

    # -- the loop ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.waiting or self.prefilling or self.running:
                self._reap()
                await self._admit()
                if self.prefilling:
                    await self._prefill()
                if self.running:
                    await self._step()
                self._report()
                await asyncio.sleep(0)  # let the requests' consumers take their tokens

    def _reap(self) -> None:
        """Forget the sequences whose consumers left or no longer need them; free their blocks."""
        for queue in (self.waiting, self.prefilling, self.running):
            for seq in [s for s in queue if s.request.gone(s)]:
                queue.remove(seq)
                self.decoder.free(seq)
                seq.swapped = None

    async def _admit(self) -> None:
        decoder, pool = self.decoder, self.decoder.pool
        while self.waiting:
            seq = self.waiting[0]
            busy = len(self.running) + sum(s.params.n for s in self.prefilling)
            if busy and busy + (1 if seq.swapped is not None else seq.params.n) > self.max_running:
                return  # a request for n answers takes n places once forked (all of them, when alone)
            if pool.free_blocks < decoder.blocks_to_start(seq) + len(self.running):
                return  # first come, first served: the head waits for room, the others behind it
            self.waiting.popleft()
            if seq.swapped is not None:
                await self.thread(decoder.swap_in, seq)
                self.running.append(seq)
            else:
                decoder.start(seq)
                self.prefilling.append(seq)
            seq.request.admit()

    async def _prefill(self) -> None:
        seq = self.prefilling[0]
        before = seq.length
        try:
            results = await self.thread(self.decoder.prefill, seq)
        except Exception as exc:
            log.exception("a prefill failed")
            self.prefilling.popleft()
            self.decoder.free(seq)
            seq.request.fail(DecodeFailure.from_exception(exc))
            return
        self.metrics.prefill_positions.inc(seq.length - before)
        if results is None:
            return
        self.prefilling.popleft()
        self._deliver(results)

    def _deliver(self, results: list[Sampled]) -> None:
        for sampled in results:
            sampled.seq.request.deliver(sampled)
            if sampled.seq.blocks and sampled.seq not in self.running:  # not ended by this token
                self.running.append(sampled.seq)
        self.running = [s for s in self.running if s.blocks]

    async def _step(self) -> None:
        decoder, pool = self.decoder, self.decoder.pool
        while sum(decoder.needs_block(s) for s in self.running) > pool.free_blocks:
            victim = self.running.pop()  # the newest: it has waited least and holds least
            await self.thread(decoder.swap_out, victim)
            self.waiting.appendleft(victim)
            self.metrics.num_preemptions.inc()
        try:
            results = await self.thread(decoder.step, list(self.running))
        except Exception as exc:
            log.exception("a batched decode step failed; failing the %d sequences it carried",
                          len(self.running))
            failure = DecodeFailure.from_exception(exc)
            for seq in self.running:
                decoder.free(seq)
                seq.request.fail(failure)
            self.running = []
            if failure.out_of_memory and torch.cuda.is_available():
                await self.thread(torch.cuda.empty_cache)
            return
        self._deliver(results)

    def _report(self) -> None:
        if self.decoder is not None:
            self.metrics.kv_cache_usage.set(self.decoder.pool.usage())
