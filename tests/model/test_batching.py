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
    batch = BatchedDecoder(tiny_model.llm, max_slots=3, capacity=capacity, eos_id=-1)
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
            # requests leave mid-batch at their budget (freed by the decoder itself), others join
        admit()
        steps += 1
    assert [outputs[i] for i in range(len(prompts))] == expected
    # Batching happened: far fewer steps than decoding the five requests one after another.
    assert steps < len(prompts) * (NEW_TOKENS - 1)


def test_cancelled_request_frees_its_slot_and_others_continue(tiny_model, prompts):
    batch = BatchedDecoder(tiny_model.llm, max_slots=2, capacity=256, eos_id=-1)
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
    batch = BatchedDecoder(tiny_model.llm, max_slots=1, capacity=64, eos_id=-1)
    assert batch.fits(30, 30)
    assert not batch.fits(40, 30)


def test_a_request_is_freed_at_its_budget_and_at_eos(tiny_model, prompts):
    """Nothing is decoded past ``max_new_tokens`` or EOS, whether or not the caller removes the slot."""
    short = GenerationParams(max_new_tokens=5, temperature=0.0)
    alone = _alone(tiny_model, prompts[0], GenerationParams(max_new_tokens=NEW_TOKENS, temperature=0.0))
    eos = alone[7]  # pretend the 8th token greedy decoding makes is EOS
    first_eos = alone.index(eos)
    batch = BatchedDecoder(tiny_model.llm, max_slots=2, capacity=256, eos_id=eos)
    outputs = {"short": [batch.add("short", prompts[1], short)], "eos": [batch.add("eos", prompts[0], _params(0))]}
    stepped = {"short": 0, "eos": 0}
    while batch.active:
        for request, token in batch.step():
            outputs[request].append(token)
            stepped[request] += 1
    assert len(outputs["short"]) == 5 and stepped["short"] == 4
    assert outputs["eos"] == alone[: first_eos + 1] and outputs["eos"][-1] == eos
    assert batch.has_room() and batch.cache.cursor == 0


def test_a_request_ending_at_its_first_token_never_takes_a_slot(tiny_model, prompts):
    batch = BatchedDecoder(tiny_model.llm, max_slots=1, capacity=256, eos_id=-1)
    batch.add("one", prompts[2], GenerationParams(max_new_tokens=1, temperature=0.0))
    assert batch.active == 0 and batch.step() == []


def test_drain_drops_every_slot_and_leaves_a_working_batch(tiny_model, prompts):
    batch = BatchedDecoder(tiny_model.llm, max_slots=3, capacity=256, eos_id=-1)
    for name, prompt in zip("abc", prompts):
        batch.add(name, prompt, _params(0))
    batch.step()
    assert sorted(batch.drain()) == ["a", "b", "c"] and batch.active == 0 and batch.cache.cursor == 0
    expected = _alone(tiny_model, prompts[3], _params(0))
    tokens = [batch.add("d", prompts[3], _params(0))]
    while batch.active:
        tokens += [token for _, token in batch.step()]
    assert tokens == expected
