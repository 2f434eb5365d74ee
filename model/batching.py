"""Continuous batching of decode steps: many requests, one LLM forward per generated token.

Each request is prefilled on its own (prompts differ in length and arrive at any time), then its
KV entries are copied into a slot of a shared static cache of ``capacity`` positions. All slots
write their next token at one shared cursor, so a decode step is a single batched forward; a
slot whose prompt was shorter simply has masked holes in front of it. RoPE positions are each
slot's true length, so every request computes exactly what it would alone. Active slots are kept
at the front (``0..n-1``) so a step runs on views of the cache, never on idle rows; when the
cursor reaches the end, the slots are compacted. A slot is freed as soon as its request ends
at EOS or at its token budget, so nothing is ever decoded past ``max_new_tokens``, whether or
not the caller is keeping up with the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, LlamaForCausalLM
from transformers.cache_utils import Cache, StaticLayer

from .generate import _CACHE_KW, GenerationParams, prefill, sample


class _SlotLayer(StaticLayer):
    """A static layer that writes at the owner's cursor, on the first ``owner.active`` rows only."""

    def __init__(self, capacity: int, owner: "SlotCache") -> None:
        super().__init__(max_cache_len=capacity)
        self.owner = owner

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n, end = key_states.shape[0], self.owner.cursor + key_states.shape[-2]
        keys, values = self.keys[:n], self.values[:n]
        pos = torch.arange(self.owner.cursor, end, device=keys.device)
        keys.index_copy_(2, pos, key_states)
        values.index_copy_(2, pos, value_states)
        # Attend over the used prefix only, not the whole capacity.
        return keys[:, :, :end], values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.cursor + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.cursor


class SlotCache(Cache):
    def __init__(self, num_layers: int, capacity: int) -> None:
        self.cursor = 0
        super().__init__(layers=[_SlotLayer(capacity, self) for _ in range(num_layers)])

    def allocate(self, slots: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        probe = torch.zeros(slots, heads, 1, head_dim, dtype=dtype, device=device)
        for layer in self.layers:
            layer.lazy_initialization(probe, probe)


@dataclass
class _Slot:
    request: object  # the caller's handle, returned with each token
    length: int  # tokens in the cache for this request
    token: int  # the last sampled token, not yet in the cache
    params: GenerationParams
    generator: torch.Generator | None
    generated: int = 1


class BatchedDecoder:
    """Not thread-safe: call it from one thread (the worker's model thread)."""

    def __init__(self, llm: LlamaForCausalLM, max_slots: int, capacity: int, *, eos_id: int) -> None:
        config = llm.config
        self.llm = llm
        self.eos_id = eos_id
        self.max_slots = max_slots
        self.capacity = capacity
        self.cache = SlotCache(config.num_hidden_layers, capacity)
        heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache.allocate(max_slots, heads, head_dim, llm.dtype, llm.device)
        self.mask = torch.zeros(max_slots, capacity, dtype=torch.long, device=llm.device)
        self.slots: list[_Slot] = []

    @property
    def active(self) -> int:
        return len(self.slots)

    def fits(self, prompt_len: int, max_new_tokens: int) -> bool:
        return prompt_len + max_new_tokens < self.capacity

    def has_room(self) -> bool:
        return len(self.slots) < self.max_slots

    def _finished(self, token: int, generated: int, params: GenerationParams) -> bool:
        return token == self.eos_id or generated >= params.max_new_tokens

    @torch.inference_mode()
    def add(self, request: object, inputs_embeds: torch.Tensor, params: GenerationParams) -> int:
        """Prefill one request into a free slot; return its first token (a request that ends
        with it never takes a slot)."""
        if not self.has_room():
            raise RuntimeError("no free decode slot")
        length = inputs_embeds.shape[1]
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=inputs_embeds.device).manual_seed(params.seed)
        own = DynamicCache(config=self.llm.config)
        token = sample(prefill(self.llm, inputs_embeds, own), params, generator)
        if self._finished(token, 1, params):
            return token
        if self.cache.cursor < length or self.cache.cursor + params.max_new_tokens >= self.capacity:
            self._compact(minimum=length)
        row, end = len(self.slots), self.cache.cursor
        for mine, layer in zip(own.layers, self.cache.layers):
            layer.keys[row, :, end - length : end] = mine.keys[0]
            layer.values[row, :, end - length : end] = mine.values[0]
        self.mask[row].zero_()
        self.mask[row, end - length : end] = 1
        self.slots.append(_Slot(request, length, token, params, generator))
        return token

    @torch.inference_mode()
    def step(self) -> list[tuple[object, int]]:
        """One decode step for every slot: feed each slot's last token, sample its next one.
        Slots whose request this token ends are freed before returning."""
        n = len(self.slots)
        if n == 0:
            return []
        if self.cache.cursor + 1 >= self.capacity:
            self._compact(minimum=0)
        cursor = self.cache.cursor
        device = self.mask.device
        ids = torch.tensor([[s.token] for s in self.slots], device=device)
        positions = torch.tensor([[s.length] for s in self.slots], device=device)
        self.mask[:n, cursor] = 1
        out = self.llm(
            input_ids=ids, position_ids=positions, attention_mask=self.mask[:n, : cursor + 1], use_cache=True,
            cache_position=torch.tensor([cursor], device=device), **{_CACHE_KW: self.cache},
        )
        self.cache.cursor += 1
        logits = out.logits[:, -1]
        results, ended = [], []
        for i, slot in enumerate(self.slots):
            slot.length += 1
            slot.generated += 1
            slot.token = sample(logits[i], slot.params, slot.generator)
            results.append((slot.request, slot.token))
            if self._finished(slot.token, slot.generated, slot.params):
                ended.append(slot.request)
        for request in ended:
            self.remove(request)
        return results

    def remove(self, request: object) -> None:
        """Free the request's slot; the last slot moves into its row so active rows stay in front."""
        index = next((i for i, s in enumerate(self.slots) if s.request is request), None)
        if index is None:
            return
        last = len(self.slots) - 1
        if index != last:
            for layer in self.cache.layers:
                layer.keys[index] = layer.keys[last]
                layer.values[index] = layer.values[last]
            self.mask[index] = self.mask[last]
            self.slots[index] = self.slots[last]
        self.mask[last].zero_()
        self.slots.pop()
        if not self.slots:
            self.cache.cursor = 0

    def drain(self) -> list[object]:
        """Drop every slot (after a failed step left the cache in an unknown state); return their handles."""
        handles = [slot.request for slot in self.slots]
        self.slots.clear()
        self.mask.zero_()
        self.cache.cursor = 0
        return handles

    def _compact(self, minimum: int) -> None:
        """Right-align every slot's entries at a new cursor, dropping the holes."""
        target = max([minimum] + [s.length for s in self.slots])
        if target >= self.capacity:
            raise RuntimeError(f"a sequence of {target} tokens does not fit the batch cache of {self.capacity}")
        for row, slot in enumerate(self.slots):
            valid = self.mask[row].nonzero().squeeze(1)
            for layer in self.cache.layers:
                layer.keys[row, :, target - slot.length : target] = layer.keys[row, :, valid].clone()
                layer.values[row, :, target - slot.length : target] = layer.values[row, :, valid].clone()
            self.mask[row].zero_()
            self.mask[row, target - slot.length : target] = 1
        self.cache.cursor = target
