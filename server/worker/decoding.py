"""Where a request's tokens come from: the shared batched decoder, or a decoder of its own.

``Decoding`` owns the one ``BatchedDecoder`` of the process. It is built at warm-up, before the
service reports ready, so concurrent first requests cannot race to create it. A request whose
prompt and budget fit the batch cache is prefilled alone and then stepped with every other
running request, one forward per generated token; one that does not fit decodes on its own. A
decode step that raises (an out-of-memory error, say) fails every request it carried with a
clear error, frees their slots and leaves an empty batch for the next requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Protocol

import torch

from model.batching import BatchedDecoder
from model.generate import GenerationParams
from model.llama_vid import LlamaVid, PreparedPrompt

from .model_thread import ModelThread

log = logging.getLogger(__name__)


class DecodeFailure(Exception):
    """Generation failed on the device; ``status`` is what the client's error event carries."""

    def __init__(self, cause: BaseException) -> None:
        self.out_of_memory = isinstance(cause, torch.cuda.OutOfMemoryError)
        if self.out_of_memory:
            self.status, self.code = 503, "out_of_memory"
            message = "the GPU ran out of memory while generating; retry, or ask with fewer frames or max_tokens"
        else:
            self.status, self.code = 500, "decode_failed"
            message = f"generation failed: {type(cause).__name__}: {cause}"
        super().__init__(message)
        self.message = message


class TokenSource(Protocol):
    async def next(self) -> int: ...
    async def close(self) -> None: ...


class Decoding:
    def __init__(self, model: LlamaVid, thread: ModelThread, *, max_slots: int, capacity: int) -> None:
        self.model = model
        self.thread = thread
        self.max_slots = max_slots
        self.capacity = capacity  # positions per slot of the shared cache; 0 decodes every request alone
        self.batch: BatchedDecoder | None = None
        self._loop: asyncio.Task | None = None

    async def start(self) -> None:
        if self.capacity > 0 and self.batch is None:
            capacity = min(2 * self.model.context_length, self.capacity)
            self.batch = await self.thread(self.model.batch_decoder, self.max_slots, capacity)

    def open(self, prepared: PreparedPrompt, params: GenerationParams) -> TokenSource:
        batch = self.batch
        if batch is not None and batch.fits(prepared.num_prompt_tokens, params.max_new_tokens):
            return _BatchedTokens(self, prepared.inputs_embeds, params)
        return _SingleTokens(self.thread, self.model.tokens(prepared, params))

    def ensure_stepping(self) -> None:
        if self._loop is None or self._loop.done():
            self._loop = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        """One batched decode step after another while any request holds a slot."""
        batch = self.batch
        assert batch is not None
        while batch.active:
            try:
                results = await self.thread(batch.step)
            except Exception as exc:
                log.exception("a batched decode step failed; failing the %d requests it carried", batch.active)
                failure = DecodeFailure(exc)
                for handle in await self.thread(_drain, batch, failure.out_of_memory):
                    handle.fail(failure)
                continue
            for handle, token in results:
                handle.deliver(token)


def _drain(batch: BatchedDecoder, out_of_memory: bool) -> list:
    handles = batch.drain()
    if out_of_memory and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return handles


class _SingleTokens:
    """A request decoded on its own (it does not fit the batch cache)."""

    def __init__(self, thread: ModelThread, tokens: Iterator[int]) -> None:
        self.thread, self.tokens = thread, tokens

    async def next(self) -> int:
        try:
            return await self.thread(next, self.tokens)
        except torch.cuda.OutOfMemoryError as exc:
            raise DecodeFailure(exc) from exc

    async def close(self) -> None:
        await self.thread(self.tokens.close)


class _BatchedTokens:
    """A request in the shared batch: prefilled alone, then stepped with the others."""

    def __init__(self, decoding: Decoding, inputs_embeds: torch.Tensor, params: GenerationParams) -> None:
        self.decoding, self.inputs_embeds, self.params = decoding, inputs_embeds, params
        self.queue: asyncio.Queue[int | DecodeFailure] = asyncio.Queue()
        self.added = False

    def deliver(self, token: int) -> None:
        self.queue.put_nowait(token)

    def fail(self, failure: DecodeFailure) -> None:
        self.queue.put_nowait(failure)

    async def next(self) -> int:
        batch = self.decoding.batch
        assert batch is not None
        if not self.added:
            self.added = True
            try:
                token = await self.decoding.thread(batch.add, self, self.inputs_embeds, self.params)
            except torch.cuda.OutOfMemoryError as exc:
                raise DecodeFailure(exc) from exc
            self.inputs_embeds = None  # the prompt lives in the batch cache now
            self.decoding.ensure_stepping()
            return token
        item = await self.queue.get()
        if isinstance(item, DecodeFailure):
            raise item
        return item

    async def close(self) -> None:
        batch = self.decoding.batch
        if self.added and batch is not None:
            await self.decoding.thread(batch.remove, self)
