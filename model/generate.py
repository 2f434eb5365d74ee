"""Token-by-token generation from spliced input embeddings, with a KV cache.

Split gpt-fast style into ``prefill`` / ``decode_one`` / ``sample`` so the hot step stays small.
Sampling follows transformers 4.31, which produced the official numbers: temperature, then
top-k (50 unless told otherwise, as ``generate`` did implicitly), then top-p. Temperature 0
means greedy. Generation stops at EOS, at ``max_new_tokens`` or when the caller stops
iterating, so a cancelled request costs at most one more decode step.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache, LlamaForCausalLM

# cuDNN's attention plans anew for every key length, and a decode step's keys are one longer each
# time: measured on an H200 at 7B, ~1.2 ms of host time per layer per token, more than the step's
# whole GPU time. The LLM runs on the other kernels (on a CPU this is what it ran anyway).
LLM_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# transformers 5.24 renamed ``past_key_values`` to ``cache``; accept either release line.
_CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 50
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5

    def validate(self) -> "GenerationParams":
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        return self


@dataclass(frozen=True)
class GenerationDefaults:
    """``generation_config.json`` values used when a request leaves a field out (spec §5.7).

    The released file has temperature 0.9 / top_p 0.6 but no ``do_sample``, so transformers
    decoded greedily unless the caller asked to sample; ``temperature`` here is therefore the
    value used *when sampling*, and plain requests default to greedy.
    """

    sampling_temperature: float = 0.9
    top_p: float = 0.6
    max_length: int = 4096
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dir(cls, model_dir: Path) -> "GenerationDefaults":
        path = model_dir / "generation_config.json"
        if not path.is_file():
            return cls()
        raw = json.loads(path.read_text())
        return cls(
            sampling_temperature=float(raw.get("temperature", 0.9)),
            top_p=float(raw.get("top_p", 0.6)),
            max_length=int(raw.get("max_length", 4096)),
            extra=raw,
        )

    def apply(self, *, temperature: float | None = None, top_p: float | None = None, **kwargs) -> GenerationParams:
        extra = {k: v for k, v in kwargs.items() if v is not None}
        if "stop" in extra:
            extra["stop"] = tuple(extra["stop"])
        params = GenerationParams(
            temperature=0.0 if temperature is None else temperature,
            top_p=self.top_p if top_p is None else top_p,
            **extra,
        )
        return params.validate()


def sample(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None) -> int:
    """One token id from the last position's logits [vocab]."""
    if params.greedy:
        return int(logits.argmax(-1))
    scores = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - params.top_p)
        remove[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def prefill(llm: LlamaForCausalLM, inputs_embeds: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Run the prompt [1, L, H] through the LLM; return the last position's logits [vocab]."""
    with sdpa_kernel(LLM_ATTENTION):
        out = llm(inputs_embeds=inputs_embeds, use_cache=True, logits_to_keep=1, **{_CACHE_KW: cache})
    return out.logits[0, -1]


def decode_one(llm: LlamaForCausalLM, token: int, cache: DynamicCache) -> torch.Tensor:
    ids = torch.tensor([[token]], device=llm.device)
    with sdpa_kernel(LLM_ATTENTION):
        out = llm(input_ids=ids, use_cache=True, **{_CACHE_KW: cache})
    return out.logits[0, -1]


def generate_tokens(
    llm: LlamaForCausalLM,
    inputs_embeds: torch.Tensor,
    params: GenerationParams,
    *,
    eos_id: int,
) -> Iterator[int]:
    """Yield generated ids one at a time; the last one is EOS if the model chose to stop."""
    generator = None
    if params.seed is not None and not params.greedy:
        generator = torch.Generator(device=inputs_embeds.device).manual_seed(params.seed)
    cache = DynamicCache(config=llm.config)
    # Inference mode is entered per step, never held across a ``yield``: it is thread-local
    # state, and a server interleaves many of these generators on one thread.
    with torch.inference_mode():
        logits = prefill(llm, inputs_embeds, cache)
        token = sample(logits, params, generator)
    for step in range(params.max_new_tokens):
        yield token
        if token == eos_id or step + 1 == params.max_new_tokens:
            return
        with torch.inference_mode():
            logits = decode_one(llm, token, cache)
            token = sample(logits, params, generator)


def with_budget(params: GenerationParams, prompt_len: int, context: int) -> GenerationParams:
    """Clamp ``max_new_tokens`` to the context window left after the prompt (the official workers do)."""
    room = context - prompt_len
    if room < 1:
        raise ValueError(f"the prompt has {prompt_len} tokens, the model's context is {context}: use fewer frames")
    return replace(params, max_new_tokens=min(params.max_new_tokens, room))
