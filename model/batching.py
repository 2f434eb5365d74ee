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

Not thread-safe: call it from one thread (the worker's model thread).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention import sdpa_kernel
from transformers import LlamaForCausalLM

from .generate import _CACHE_KW, LLM_ATTENTION, GenerationParams, sample
from .kv_cache import PADDING_BLOCK, BlockPool, PagedCache


@dataclass(eq=False)
class Sequence:
    request: object  # the caller's handle, returned with each token
    params: GenerationParams
    prompt: torch.Tensor | None  # [1, L, H] until prefilled
    prompt_len: int
    generator: torch.Generator | None
    blocks: list[int]
    length: int = 0  # positions in the cache
    token: int | None = None  # the last sampled token, not yet in the cache
    generated: int = 0
    swapped: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer, on the host, while preempted

    @property
    def prefilled(self) -> bool:
        return self.length >= self.prompt_len

    @property
    def positions_needed(self) -> int:
        """Positions the sequence will hold at most: its prompt and its whole token budget."""
        return self.prompt_len + self.params.max_new_tokens


class PagedDecoder:
    def __init__(self, llm: LlamaForCausalLM, pool: BlockPool, *, eos_id: int,
                 prefill_chunk: int = 2048) -> None:
        self.llm = llm
        self.pool = pool
        self.eos_id = eos_id
        self.prefill_chunk = prefill_chunk
        self.cache = PagedCache(pool)

    # -- requests ----------------------------------------------------------------------------------
    def sequence(self, request: object, inputs_embeds: torch.Tensor, params: GenerationParams) -> Sequence:
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=inputs_embeds.device).manual_seed(params.seed)
        return Sequence(request, params, inputs_embeds, inputs_embeds.shape[1], generator, [])

    def fits_ever(self, seq: Sequence) -> bool:
        return self.pool.blocks_for(seq.positions_needed) <= self.pool.usable_blocks

    def blocks_to_start(self, seq: Sequence) -> int:
        """Blocks ``start`` or ``swap_in`` takes: the prompt's (or what the sequence held) and one to
        grow into."""
        held = seq.length if seq.swapped is not None else seq.prompt_len
        return self.pool.blocks_for(held + 1)

    def start(self, seq: Sequence) -> None:
        seq.blocks = self.pool.allocate(self.blocks_to_start(seq))

    def free(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks = []

    def needs_block(self, seq: Sequence) -> bool:
        """Whether the sequence's next decode step writes past its last block."""
        return seq.length >= len(seq.blocks) * self.pool.block_size

    def _finished(self, seq: Sequence) -> bool:
        return seq.token == self.eos_id or seq.generated >= seq.params.max_new_tokens

    # -- compute -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seq: Sequence) -> int | None:
        """Prefill the next chunk of the prompt; return the first token once the whole prompt is in
        (the sequence is freed right away if that token already ends it)."""
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
        seq.prompt = None
        seq.token, seq.generated = sample(out.logits[0, -1], seq.params, seq.generator), 1
        if self._finished(seq):
            self.free(seq)
        return seq.token

    @torch.inference_mode()
    def step(self, seqs: list[Sequence]) -> list[tuple[object, int]]:
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
        logits = out.logits[:, -1]
        greedy = logits.argmax(-1).tolist()  # one transfer for every greedy row, not one per row
        results = []
        for i, seq in enumerate(seqs):
            seq.length += 1
            seq.generated += 1
            seq.token = greedy[i] if seq.params.greedy else sample(logits[i], seq.params, seq.generator)
            results.append((seq.request, seq.token))
            if self._finished(seq):
                self.free(seq)
        return results

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
