"""Continuous batching over the paged KV cache must not change what any request generates."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model.batching import PagedDecoder
from model.generate import GenerationParams, generate_tokens
from model.kv_cache import BlockPool

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def prompts(tiny_model):
    torch.manual_seed(0)
    embed = tiny_model.llm.get_input_embeddings()
    with torch.inference_mode():
        return [embed(torch.randint(3, tiny_model.tokenizer.vocab_size, (1, n))) for n in (20, 35, 9, 44, 14)]


def _params(i: int, new: int = NEW_TOKENS) -> GenerationParams:
    # Alternate greedy and seeded sampling so both paths are checked.
    return GenerationParams(max_new_tokens=new, temperature=0.0 if i % 2 == 0 else 0.8, seed=11 + i)


def _alone(llm, embeds, params) -> list[int]:
    return list(generate_tokens(llm, embeds, params, eos_id=-1))


def _decoder(llm, num_blocks: int, block_size: int = 4, prefill_chunk: int = 2048,
             eos_id: int = -1) -> PagedDecoder:
    config = llm.config
    pool = BlockPool(config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads,
                     config.hidden_size // config.num_attention_heads, llm.dtype, llm.device)
    return PagedDecoder(llm, pool, eos_id=eos_id, prefill_chunk=prefill_chunk)


def _run(decoder: PagedDecoder, prompts, params, max_running: int) -> dict[int, list[int]]:
    """Admit up to ``max_running`` at a time, prefill each, step them all until every one is done."""
    waiting = [decoder.sequence(i, p, params(i)) for i, p in enumerate(prompts)]
    running, out = [], {}
    while waiting or running:
        while waiting and len(running) < max_running:
            seq = waiting.pop(0)
            decoder.start(seq)
            while (first := decoder.prefill(seq)) is None:
                pass
            out[seq.request] = [first[0].token]
            if seq.blocks:  # not ended by its first token
                running.append(seq)
        for sampled in decoder.step(running):
            out[sampled.seq.request].append(sampled.token)
        running = [seq for seq in running if seq.blocks]
    return out


@pytest.mark.parametrize("block_size", [4, 16])
def test_batched_tokens_equal_tokens_generated_alone(tiny_model, prompts, block_size):
    llm = tiny_model.llm
    expected = [_alone(llm, e, _params(i)) for i, e in enumerate(prompts)]
    decoder = _decoder(llm, num_blocks=64, block_size=block_size)
    out = _run(decoder, prompts, _params, max_running=3)  # requests leave mid-batch, others join
    assert [out[i] for i in range(len(prompts))] == expected
    assert decoder.pool.free_blocks == decoder.pool.usable_blocks  # every block came back


def test_chunked_prefill_computes_the_same_answer(tiny_model, prompts):
    """A prompt prefilled 8 positions at a time attends to exactly what one forward would see."""
    llm = tiny_model.llm
    expected = [_alone(llm, e, _params(0)) for e in prompts]
    out = _run(_decoder(llm, num_blocks=64, prefill_chunk=8), prompts, lambda i: _params(0), max_running=5)
    assert [out[i] for i in range(len(prompts))] == expected


def test_memory_follows_live_positions_not_slots(tiny_model, prompts):
    """Blocks in use grow with each sequence's length, one block at a time, and are freed at its end."""
    decoder = _decoder(tiny_model.llm, num_blocks=64, block_size=4)
    seq = decoder.sequence("a", prompts[2], _params(0, new=12))  # 9 positions of prompt
    decoder.start(seq)
    assert len(seq.blocks) == decoder.pool.blocks_for(9 + 1) == 3
    decoder.prefill(seq)
    used = []
    while seq.blocks:
        decoder.step([seq])
        used.append(decoder.pool.usable_blocks - decoder.pool.free_blocks)
    # positions 9, 10, 11 fit the third block, 12 takes a fourth; the last token is never written
    assert used[:4] == [3, 3, 3, 4] and max(used) == decoder.pool.blocks_for(9 + 12 - 1) and used[-1] == 0
    assert decoder.pool.free_blocks == decoder.pool.usable_blocks


def test_a_sequence_ends_at_its_budget_and_at_eos(tiny_model, prompts):
    """Nothing is decoded past ``max_new_tokens`` or EOS, whether or not the caller is listening."""
    llm = tiny_model.llm
    alone = _alone(llm, prompts[0], _params(0))
    eos = alone[7]  # pretend the 8th token greedy decoding makes is EOS
    decoder = _decoder(llm, num_blocks=64, eos_id=eos)
    out = _run(decoder, [prompts[0], prompts[1]], lambda i: _params(0) if i == 0 else _params(2, new=5), 2)
    assert out[0] == alone[: alone.index(eos) + 1] and len(out[1]) == 5
    one = decoder.sequence("one", prompts[2], _params(0, new=1))
    decoder.start(one)
    decoder.prefill(one)
    assert one.blocks == [] and decoder.pool.free_blocks == decoder.pool.usable_blocks


def test_swap_out_and_back_in_is_exact(tiny_model, prompts):
    """A preempted sequence's keys and values wait on the host; resumed, it goes on as if never paused."""
    llm = tiny_model.llm
    expected = _alone(llm, prompts[3], _params(1))
    decoder = _decoder(llm, num_blocks=64)
    seq = decoder.sequence("s", prompts[3], _params(1))
    decoder.start(seq)
    tokens = [decoder.prefill(seq)[0].token]
    for _ in range(5):
        tokens += [s.token for s in decoder.step([seq])]
    decoder.swap_out(seq)
    assert seq.blocks == [] and decoder.pool.free_blocks == decoder.pool.usable_blocks
    other = decoder.sequence("o", prompts[4], _params(0))  # another request reuses the blocks meanwhile
    decoder.start(other)
    decoder.prefill(other)
    decoder.step([other])
    decoder.swap_in(seq)
    while seq.blocks:
        tokens += [s.token for s in decoder.step([seq, other] if other.blocks else [seq]) if s.seq is seq]
    assert tokens == expected


def test_a_full_pool_refuses_more_blocks(tiny_model, prompts):
    decoder = _decoder(tiny_model.llm, num_blocks=4, block_size=4)  # 3 usable blocks: 12 positions
    seq = decoder.sequence("big", prompts[1], _params(0))  # 35 positions of prompt
    assert not decoder.fits_ever(seq)
    with pytest.raises(MemoryError, match="free"):
        decoder.start(seq)


def test_real_head_sizes(tmp_path):
    """The same equivalence at Vicuna-7B's attention shape (32 heads of 128), two layers."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=4096, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=512)
    llm = LlamaForCausalLM(config).eval()
    with torch.inference_mode():
        embeds = [llm.get_input_embeddings()(torch.randint(3, 512, (1, n))) for n in (17, 40, 5)]
    expected = [_alone(llm, e, _params(i, new=8)) for i, e in enumerate(embeds)]
    out = _run(_decoder(llm, num_blocks=32, block_size=16, prefill_chunk=16), embeds,
               lambda i: _params(i, new=8), 3)
    assert [out[i] for i in range(3)] == expected


# -- n answers, log-probabilities, penalties -------------------------------------------------------------
def _answers(decoder: PagedDecoder, seq) -> dict[int, list]:
    """Every answer of one request, by index: prefill (forking), then steps until all end."""
    decoder.start(seq)
    while (first := decoder.prefill(seq)) is None:
        pass
    out = {s.seq.index: [s] for s in first}
    running = [s.seq for s in first if s.seq.blocks]
    while running:
        for sampled in decoder.step(running):
            out[sampled.seq.index].append(sampled)
        running = [s for s in running if s.blocks]
    return out


@pytest.mark.parametrize("block_size", [4, 5])  # the prompt ends mid-block / on a block boundary
def test_n_answers_fork_from_one_prefill(tiny_model, prompts, block_size):
    """Answer i of a seeded request for n is what the same request alone with seed + i generates; the
    prompt runs through the LLM once and its full blocks are shared, not copied."""
    llm = tiny_model.llm
    params = GenerationParams(max_new_tokens=NEW_TOKENS, temperature=0.9, seed=5, n=3)
    expected = [_alone(llm, prompts[1], GenerationParams(max_new_tokens=NEW_TOKENS, temperature=0.9, seed=5 + i))
                for i in range(3)]
    decoder = _decoder(llm, num_blocks=64, block_size=block_size)
    forwards = []
    handle = llm.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(
        kwargs["inputs_embeds"].shape[1] if kwargs.get("inputs_embeds") is not None else 0), with_kwargs=True)
    try:
        seq = decoder.sequence("r", prompts[1], params)  # 35 positions of prompt
        decoder.start(seq)
        assert decoder.pool.usable_blocks - decoder.pool.free_blocks == decoder.blocks_to_start(seq) == \
            decoder.pool.blocks_for(36) + 2
        while (first := decoder.prefill(seq)) is None:
            pass
        siblings = [s.seq for s in first]
        full = 35 // block_size
        assert [s.index for s in siblings] == [0, 1, 2]
        assert all(s.blocks[:full] == seq.blocks[:full] for s in siblings)  # shared
        assert len({s.blocks[full] for s in siblings}) == 3  # each its own last block
        out = {s.seq.index: [s.token] for s in first}
        running = list(siblings)
        while running:
            for sampled in decoder.step(running):
                out[sampled.seq.index].append(sampled.token)
            running = [s for s in running if s.blocks]
    finally:
        handle.remove()
    assert [out[i] for i in range(3)] == expected and len(set(map(tuple, expected))) == 3
    assert sum(forwards) == 35  # the prompt's embeddings went through the LLM once
    assert decoder.pool.free_blocks == decoder.pool.usable_blocks  # shared blocks freed by the last holder


def test_fitting_counts_every_answer(tiny_model, prompts):
    decoder = _decoder(tiny_model.llm, num_blocks=16, block_size=4)  # 15 usable blocks
    one = decoder.sequence("a", prompts[2], GenerationParams(max_new_tokens=20))  # 9 + 20 positions: 8 blocks
    assert decoder.fits_ever(one)
    # each more answer shares the 2 full prompt blocks and needs 6 of its own
    assert decoder.fits_ever(decoder.sequence("b", prompts[2], GenerationParams(max_new_tokens=20, n=2)))
    assert not decoder.fits_ever(decoder.sequence("c", prompts[2], GenerationParams(max_new_tokens=20, n=3)))


def test_logprobs_are_the_models_own(tiny_model, prompts):
    """Each answer token's log-probability and top-k equal a direct forward pass over prompt + answer."""
    llm = tiny_model.llm
    params = GenerationParams(max_new_tokens=10, temperature=0.8, seed=3, logprobs=4)
    out = _answers(_decoder(llm, num_blocks=64), _decoder(llm, 64).sequence("r", prompts[0], params))[0]
    tokens = [s.token for s in out]
    with torch.inference_mode():
        embeds = torch.cat((prompts[0], llm.get_input_embeddings()(torch.tensor([tokens[:-1]]))), dim=1)
        logp = torch.log_softmax(llm(inputs_embeds=embeds).logits[0, prompts[0].shape[1] - 1 :].float(), -1)
    for step, sampled in enumerate(out):
        assert sampled.logprobs.token == tokens[step]
        assert sampled.logprobs.logprob == pytest.approx(float(logp[step, tokens[step]]), abs=1e-4)
        top = logp[step].topk(4)
        assert [t for t, _ in sampled.logprobs.top] == top.indices.tolist()
        assert [v for _, v in sampled.logprobs.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_penalties_follow_vllm_semantics(tiny_model, prompts):
    """Greedy decoding with penalties picks, at every step, the argmax of the logits penalised as vLLM
    does: repetition over prompt and answer ids, then frequency and presence over the answer's."""
    from transformers import RepetitionPenaltyLogitsProcessor

    llm = tiny_model.llm
    decoder = _decoder(llm, num_blocks=64)
    plain = [s.token for s in
             _answers(decoder, decoder.sequence("p", prompts[4], GenerationParams(max_new_tokens=12)))[0]]
    prompt_ids = [5, 9, 9, plain[0]]  # as if the prompt held the first word of the plain answer
    params = GenerationParams(max_new_tokens=12, repetition_penalty=1.7, frequency_penalty=0.9,
                              presence_penalty=0.6)
    out = _answers(decoder, decoder.sequence("r", prompts[4], params, prompt_ids=prompt_ids))[0]
    tokens = [s.token for s in out]
    repetition = RepetitionPenaltyLogitsProcessor(1.7)
    with torch.inference_mode():
        embeds = torch.cat((prompts[4], llm.get_input_embeddings()(torch.tensor([tokens[:-1]]))), dim=1)
        logits = llm(inputs_embeds=embeds).logits[0, prompts[4].shape[1] - 1 :].float()
    for step in range(len(tokens)):
        seen = torch.tensor([prompt_ids + tokens[:step]])
        expected = repetition(seen, logits[step : step + 1].clone())[0]
        for token in set(tokens[:step]):
            expected[token] -= 0.9 * tokens[:step].count(token) + 0.6
        assert tokens[step] == int(expected.argmax())
    assert plain != tokens  # the penalties changed the answer
