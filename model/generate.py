"""Token-by-token generation from spliced input embeddings, with a KV cache.

Split gpt-fast style into ``prefill`` / ``decode_one`` / ``sample`` so the hot step stays small.
Sampling follows transformers 4.31, which produced the official numbers: temperature, then
top-k (50 unless told otherwise, as ``generate`` did implicitly), then top-p. Temperature 0
means greedy. Before any of that, penalties with vLLM's semantics: ``repetition_penalty``
(divides a positive logit, multiplies a negative one, for every id of the prompt or the answer so
far), then ``frequency_penalty`` (times the id's count in the answer) and ``presence_penalty``
(once per id in the answer), as OpenAI defines them. Log-probabilities are the model's own
(``log_softmax`` of the raw logits, before penalties, temperature or a grammar), as vLLM reports
them by default. Generation stops at EOS, at ``max_new_tokens`` or when the caller stops
iterating, so a cancelled request costs at most one more decode step.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache, LlamaForCausalLM

if TYPE_CHECKING:
    from .structured import GrammarSpec

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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the k most likely
    n: int = 1  # answers sampled from one prefill
    grammar: GrammarSpec | None = None  # constrains every answer (``model.structured``)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def plain(self) -> bool:
        """Nothing to do between the logits and the sampler (the batched decoder's fast path)."""
        return not self.penalized and self.logprobs is None and self.grammar is None

    def validate(self) -> "GenerationParams":
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"top_logprobs must be in [0, 20], got {self.logprobs}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
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


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's log-probability and the ``k`` most likely tokens', most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def logprobs_of(logits: torch.Tensor, tokens: Sequence[int], ks: Sequence[int]) -> list[TokenLogprobs]:
    """Rows of raw logits [B, V] -> each row's chosen token and its top ``ks[i]``, in one transfer."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    k = max(ks)
    top_values, top_ids = (logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long()))
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [TokenLogprobs(tokens[i], chosen[i], tuple(zip(top_ids[i][: ks[i]], top_values[i][: ks[i]])))
            for i in range(len(tokens))]


def penalize(logits: torch.Tensor, params: GenerationParams, prompt_ids: Sequence[int],
             output_ids: Sequence[int]) -> torch.Tensor:
    """One row of logits [V] with the request's penalties applied (a new float tensor)."""
    logits = logits.float().clone()
    vocab = logits.shape[-1]
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({t for t in (*prompt_ids, *output_ids) if 0 <= t < vocab}),
                            dtype=torch.long, device=logits.device)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty,
                                   values * params.repetition_penalty)
    if output_ids and (params.frequency_penalty or params.presence_penalty):
        ids = torch.tensor([t for t in output_ids if 0 <= t < vocab], dtype=torch.long, device=logits.device)
        counts = torch.bincount(ids, minlength=vocab).to(logits.dtype)
        logits -= counts * params.frequency_penalty + (counts > 0).to(logits.dtype) * params.presence_penalty
    return logits


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
    prompt_ids: Sequence[int] = (),
) -> Iterator[int]:
    """Yield generated ids one at a time; the last one is EOS if the model chose to stop."""
    generator = None
    if params.seed is not None and not params.greedy:
        generator = torch.Generator(device=inputs_embeds.device).manual_seed(params.seed)
    if params.n != 1 or params.grammar is not None or params.logprobs is not None:
        raise ValueError("n, grammars and logprobs need the batched decoder (model.batching)")
    cache = DynamicCache(config=llm.config)
    output: list[int] = []

    def choose(logits: torch.Tensor) -> int:
        if params.penalized:
            logits = penalize(logits, params, prompt_ids, output)
        output.append(sample(logits, params, generator))
        return output[-1]

    # Inference mode is entered per step, never held across a ``yield``: it is thread-local
    # state, and a server interleaves many of these generators on one thread.
    with torch.inference_mode():
        token = choose(prefill(llm, inputs_embeds, cache))
    for step in range(params.max_new_tokens):
        yield token
        if token == eos_id or step + 1 == params.max_new_tokens:
            return
        with torch.inference_mode():
            token = choose(decode_one(llm, token, cache))


def with_budget(params: GenerationParams, prompt_len: int, context: int) -> GenerationParams:
    """Clamp ``max_new_tokens`` to the context window left after the prompt (the official workers do)."""
    room = context - prompt_len
    if room < 1:
        raise ValueError(f"the prompt has {prompt_len} tokens, the model's context is {context}: use fewer frames")
    return replace(params, max_new_tokens=min(params.max_new_tokens, room))
