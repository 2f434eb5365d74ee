"""Continuous batching over a paged KV cache: many requests, one LLM forward per generated token.

A request is a ``Sequence``: its prompt embeddings, its blocks in the ``BlockPool`` and its sampler.
Its prompt is prefilled in chunks of at most ``prefill_chunk`` positions (one forward each, bounded
activation memory, so a caller can interleave decode steps of the others), then every decoding
sequence advances together: one forward over all of them, each attending to its own positions
(gathered from its blocks, left-padded and masked) at its own RoPE position, so every request
computes what it would alone. A sequence is freed as soon as it ends at EOS or at its token
budget, so nothing is ever decoded past ``max_new_tokens``. When the pool runs short, the caller
can move a sequence's keys and values to host memory (``swap_out``) and bring them back later
(``swap_in``): exact, unlike recomputing them.

A request for ``n`` answers is prefilled once: when its prompt is in, ``n - 1`` sibling sequences
are forked that share the prompt's full blocks (held by all, freed by the last) and copy only its
last, partly filled block, and each samples its first token from the same logits. The blocks they
need are reserved when the request starts, so a fork never waits for memory. Rows that ask for
nothing but sampling take a fast path; penalties, log-probabilities and grammars
(``model.structured``, one batched mask per step) apply row by row only where asked for.

Not thread-safe: call it from one thread (the worker's model thread).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch.nn.attention import sdpa_kernel
from transformers import LlamaForCausalLM

from .generate import _CACHE_KW, LLM_ATTENTION, GenerationParams, TokenLogprobs, logprobs_of, penalize, sample
from .kv_cache import PADDING_BLOCK, BlockPool, PagedCache

if TYPE_CHECKING:
    from .structured import GrammarCompiler, GrammarMatcher


@dataclass(eq=False)
class Sequence:
    request: object  # the caller's handle, returned with each token
    params: GenerationParams
    prompt: torch.Tensor | None  # [1, L, H] until prefilled
    prompt_len: int
    generator: torch.Generator | None
    blocks: list[int]
    index: int = 0  # which of the request's ``params.n`` answers
    prompt_ids: Seq[int] = ()  # the prompt's text ids (repetition penalty)
    output: list[int] = field(default_factory=list)  # the ids sampled so far
    matcher: GrammarMatcher | None = None
    reserved: list[int] = field(default_factory=list)  # blocks held for the siblings forked after prefill
    length: int = 0  # positions in the cache
    swapped: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer, on the host, while preempted

    @property
    def token(self) -> int | None:
        """The last sampled token, not yet in the cache."""
        return self.output[-1] if self.output else None

    @property
    def generated(self) -> int:
        return len(self.output)

    @property
    def prefilled(self) -> bool:
        return self.length >= self.prompt_len

    @property
    def positions_needed(self) -> int:
        """Positions the sequence will hold at most: its prompt and its whole token budget."""
        return self.prompt_len + self.params.max_new_tokens


@dataclass(frozen=True)
class Sampled:
    """One token of one sequence, as a step or a prefill produced it."""

    seq: Sequence
    token: int
    logprobs: TokenLogprobs | None = None


class PagedDecoder:
    def __init__(self, llm: LlamaForCausalLM, pool: BlockPool, *, eos_id: int, prefill_chunk: int = 2048,
                 grammars: Callable[[], GrammarCompiler] | None = None) -> None:
        self.llm = llm
        self.pool = pool
        self.eos_id = eos_id
        self.prefill_chunk = prefill_chunk
        self.grammars = grammars  # built on first use: it indexes the whole vocabulary
        self.cache = PagedCache(pool)

    # -- requests ----------------------------------------------------------------------------------
    def sequence(self, request: object, inputs_embeds: torch.Tensor, params: GenerationParams,
                 prompt_ids: Seq[int] = ()) -> Sequence:
        """A request's first sequence; raises ``ValueError`` (``UnsupportedGrammar``) for a grammar
        that cannot be compiled, before it takes any room."""
        matcher = None
        if params.grammar is not None:
            if self.grammars is None:
                raise ValueError("this decoder was built without a grammar compiler")
            matcher = self.grammars().compile(params.grammar).matcher()
        return Sequence(request, params, inputs_embeds, inputs_embeds.shape[1],
                        _generator(params, 0, inputs_embeds.device), [], prompt_ids=prompt_ids, matcher=matcher)

    def fits_ever(self, seq: Sequence) -> bool:
        whole = self.pool.blocks_for(seq.positions_needed)
        siblings = (seq.params.n - 1) * (whole - seq.prompt_len // self.pool.block_size)
        return whole + siblings <= self.pool.usable_blocks

    def blocks_to_start(self, seq: Sequence) -> int:
        """Blocks ``start`` or ``swap_in`` takes: the prompt's (or what the sequence held) and one to
        grow into, and one for each sibling still to fork (its copy of the last block)."""
        if seq.swapped is not None:
            return self.pool.blocks_for(seq.length + 1)
        return self.pool.blocks_for(seq.prompt_len + 1) + seq.params.n - 1

    def start(self, seq: Sequence) -> None:
        taken = self.pool.allocate(self.blocks_to_start(seq))
        if seq.swapped is None and seq.params.n > 1:
            taken, seq.reserved = taken[: 1 - seq.params.n], taken[1 - seq.params.n :]
        seq.blocks = taken

    def free(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks + seq.reserved)
        seq.blocks, seq.reserved = [], []

    def _fork(self, seq: Sequence) -> list[Sequence]:
        """The request's other ``n - 1`` sequences, at the end of its prompt: the full blocks shared,
        the last block (partly filled, or the next empty one) their own copy."""
        full = seq.prompt_len // self.pool.block_size
        siblings = []
        for index, own in enumerate(seq.reserved, start=1):
            if seq.prompt_len % self.pool.block_size:
                self.pool.copy_block(seq.blocks[full], own)
            matcher = None
            if seq.matcher is not None:
                matcher = self.grammars().compile(seq.params.grammar).matcher()
            siblings.append(replace(seq, blocks=self.pool.share(seq.blocks[:full]) + [own], index=index,
                                    generator=_generator(seq.params, index, seq.prompt.device), output=[],
                                    matcher=matcher, reserved=[]))
        seq.reserved = []
        return siblings

    def needs_block(self, seq: Sequence) -> bool:
        """Whether the sequence's next decode step writes past its last block."""
        return seq.length >= len(seq.blocks) * self.pool.block_size

    def _finished(self, seq: Sequence) -> bool:
        return seq.token == self.eos_id or seq.generated >= seq.params.max_new_tokens

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Sampled]:
        """Sample each sequence's next token from its row of ``logits`` [B, V]; free those it ends."""
        if all(seq.params.plain for seq in seqs):
            greedy = logits.argmax(-1).tolist()  # one transfer for every greedy row, not one per row
            tokens = [greedy[i] if seq.params.greedy else sample(logits[i], seq.params, seq.generator)
                      for i, seq in enumerate(seqs)]
            logprobs = [None] * len(seqs)
        else:
            processed = logits
            matchers = [seq.matcher for seq in seqs]
            constrained = any(m is not None for m in matchers)
            if constrained or any(seq.params.penalized for seq in seqs):
                processed = logits.float().clone()  # the raw logits stay for the log-probabilities
                for i, seq in enumerate(seqs):
                    if seq.params.penalized:
                        processed[i] = penalize(logits[i], seq.params, seq.prompt_ids, seq.output)
                if constrained:
                    from .structured import mask_logits  # the grammar library loads only when used

                    mask_logits(processed, matchers)
            greedy = processed.argmax(-1).tolist()
            tokens = [greedy[i] if seq.params.greedy else sample(processed[i], seq.params, seq.generator)
                      for i, seq in enumerate(seqs)]
            logprobs: list[TokenLogprobs | None] = [None] * len(seqs)
            wanted = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
            if wanted:
                rows = logprobs_of(logits[wanted], [tokens[i] for i in wanted],
                                   [seqs[i].params.logprobs for i in wanted])
                for i, row in zip(wanted, rows):
                    logprobs[i] = row
        results = []
        for seq, token, logprob in zip(seqs, tokens, logprobs):
            seq.output.append(token)
            if seq.matcher is not None and token != self.eos_id:
                seq.matcher.accept(token)
            results.append(Sampled(seq, token, logprob))
            if self._finished(seq):
                self.free(seq)
        return results

    # -- compute -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seq: Sequence) -> list[Sampled] | None:
        """Prefill the next chunk of the prompt; once the whole prompt is in, fork the request's other
        answers and return each one's first token (a sequence that token ends is freed at once)."""
        start, stop = seq.length, min(seq.prompt_len, seq.length + self.prefill_chunk)
        device = self.pool.keys[0].device
        self.cache.plan(self.pool.positions(seq.blocks, start, stop),
                        self.pool.positions(seq.blocks, 0, stop)[None], stop - start)
        positions = torch.arange(start, stop, device=device)
        with sdpa_kernel(LLM_ATTENTION):
            out = self.llm(inputs_embeds=seq.prompt[:, start:stop], position_ids=positions[None],
                           cache_position=positions, use_cache=True, logits_to_keep=1,
                           **{_CACHE_KW: self.cache})
        seq.length = stop
        if not seq.prefilled:
            return None
        seqs = [seq, *self._fork(seq)]
        seq.prompt = None
        for sibling in seqs:
            sibling.prompt = None
        return self._choose(seqs, out.logits[0, -1:].expand(len(seqs), -1))

    @torch.inference_mode()
    def step(self, seqs: list[Sequence]) -> list[Sampled]:
        """One decode step for every sequence in ``seqs`` (each with room for its next position, see
        ``needs_block``): feed each one's last token, sample its next. Sequences this token ends are
        freed before returning."""
        if not seqs:
            return []
        for seq in seqs:
            if self.needs_block(seq):
                seq.blocks += self.pool.allocate(1)
        kv_length = 1 + max(seq.length for seq in seqs)
        padding = PADDING_BLOCK * self.pool.block_size
        rows = []
        for seq in seqs:
            own = self.pool.positions(seq.blocks, 0, seq.length + 1)
            rows.append(torch.cat((torch.full((kv_length - len(own),), padding, dtype=torch.long), own)))
        read = torch.stack(rows)
        self.cache.plan(read[:, -1], read, 1)
        device = self.pool.keys[0].device
        lengths = torch.tensor([seq.length for seq in seqs], device=device)
        mask = None
        if any(seq.length + 1 < kv_length for seq in seqs):
            mask = (torch.arange(kv_length, device=device)[None] >= (kv_length - 1 - lengths)[:, None]).long()
        with sdpa_kernel(LLM_ATTENTION):
            out = self.llm(
                input_ids=torch.tensor([[seq.token] for seq in seqs], device=device),
                position_ids=lengths[:, None], attention_mask=mask,
                cache_position=torch.tensor([kv_length - 1], device=device), use_cache=True,
                **{_CACHE_KW: self.cache},
            )
        for seq in seqs:
            seq.length += 1
        return self._choose(seqs, out.logits[:, -1])

    # -- preemption --------------------------------------------------------------------------------
    def swap_out(self, seq: Sequence) -> None:
        """Copy the sequence's keys and values to host memory and free its blocks."""
        rows = self.pool.positions(seq.blocks, 0, seq.length).to(self.pool.keys[0].device)
        seq.swapped = [(k[rows].cpu(), v[rows].cpu()) for k, v in zip(self.pool.keys, self.pool.values)]
        self.free(seq)

    def swap_in(self, seq: Sequence) -> None:
        """Give a swapped-out sequence blocks again and copy its keys and values back."""
        assert seq.swapped is not None
        self.start(seq)
        rows = self.pool.positions(seq.blocks, 0, seq.length).to(self.pool.keys[0].device)
        for (keys, values), (k, v) in zip(zip(self.pool.keys, self.pool.values), seq.swapped):
            keys.index_copy_(0, rows, k.to(keys.device))
            values.index_copy_(0, rows, v.to(values.device))
        seq.swapped = None


def _generator(params: GenerationParams, index: int, device: torch.device) -> torch.Generator | None:
    """A seeded request's answer ``index`` draws from ``seed + index``: answer 0 is what ``n=1`` gives."""
    if params.seed is None or params.greedy:
        return None
    return torch.Generator(device=device).manual_seed((params.seed + index) % 2**64)
