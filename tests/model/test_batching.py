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
            while (token := decoder.prefill(seq)) is None:
                pass
            out[seq.request] = [token]
            if seq.blocks:  # not ended by its first token
                running.append(seq)
        for request, token in decoder.step(running):
            out[request].append(token)
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
    tokens = [decoder.prefill(seq)]
    for _ in range(5):
        tokens += [t for _, t in decoder.step([seq])]
    decoder.swap_out(seq)
    assert seq.blocks == [] and decoder.pool.free_blocks == decoder.pool.usable_blocks
    other = decoder.sequence("o", prompts[4], _params(0))  # another request reuses the blocks meanwhile
    decoder.start(other)
    decoder.prefill(other)
    decoder.step([other])
    decoder.swap_in(seq)
    while seq.blocks:
        tokens += [t for r, t in decoder.step([seq, other] if other.blocks else [seq]) if r == "s"]
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
