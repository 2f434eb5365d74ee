"""Continuous batching must not change what any request generates."""

from __future__ import annotations

import pytest
import torch

from model.batching import BatchedDecoder
from model.generate import GenerationParams, generate_tokens

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def prompts(tiny_model):
    torch.manual_seed(0)
    embed = tiny_model.llm.get_input_embeddings()
    with torch.inference_mode():
        return [embed(torch.randint(3, tiny_model.tokenizer.vocab_size, (1, n))) for n in (20, 35, 9, 44, 14)]


def _params(i: int) -> GenerationParams:
    # Alternate greedy and seeded sampling so both paths are checked.
    return GenerationParams(max_new_tokens=NEW_TOKENS, temperature=0.0 if i % 2 == 0 else 0.8, seed=11 + i)


def _alone(model, embeds, params) -> list[int]:
    return list(generate_tokens(model.llm, embeds, params, eos_id=-1))


@pytest.mark.parametrize("capacity", [256, 72])  # 72 forces compaction of the shared cache
def test_batched_tokens_equal_tokens_generated_alone(tiny_model, prompts, capacity):
    expected = [_alone(tiny_model, e, _params(i)) for i, e in enumerate(prompts)]
    batch = BatchedDecoder(tiny_model.llm, max_slots=3, capacity=capacity)
    waiting, outputs = list(range(len(prompts))), {}

    def admit() -> None:
        while waiting and batch.has_room():
            i = waiting.pop(0)
            outputs[i] = [batch.add(i, prompts[i], _params(i))]

    admit()
    steps = 0
    while batch.active:
        for request, token in batch.step():
            outputs[request].append(token)
            if len(outputs[request]) == NEW_TOKENS:
                batch.remove(request)  # requests leave mid-batch, others join
        admit()
        steps += 1
    assert [outputs[i] for i in range(len(prompts))] == expected
    # Batching happened: far fewer steps than decoding the five requests one after another.
    assert steps < len(prompts) * (NEW_TOKENS - 1)


def test_cancelled_request_frees_its_slot_and_others_continue(tiny_model, prompts):
    batch = BatchedDecoder(tiny_model.llm, max_slots=2, capacity=256)
    expected = _alone(tiny_model, prompts[1], _params(1))
    first = [batch.add("a", prompts[0], _params(0))]
    second = [batch.add("b", prompts[1], _params(1))]
    assert not batch.has_room()
    for request, token in batch.step():
        (first if request == "a" else second).append(token)
    batch.remove("a")  # the client went away
    assert batch.active == 1 and batch.has_room()
    while len(second) < NEW_TOKENS:
        [(request, token)] = batch.step()
        assert request == "b"
        second.append(token)
    assert second == expected


def test_fits_reports_what_the_cache_can_hold(tiny_model):
    batch = BatchedDecoder(tiny_model.llm, max_slots=1, capacity=64)
    assert batch.fits(30, 30)
    assert not batch.fits(40, 30)
