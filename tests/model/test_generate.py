"""Generation: greedy against a cache-free argmax loop, sampling controls, stop strings, budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.conversation import Message
from model.generate import GenerationDefaults, GenerationParams, generate_tokens, sample, with_budget
from model.llama_vid import VisualInput
from model.loader import load_llamavid


@pytest.fixture(scope="module")
def prepared(tiny_model, tiny_frames):
    features = tiny_model.encode_frames(tiny_model.preprocess(tiny_frames))
    return tiny_model.prepare([Message("user", "What is the man doing in the kitchen?")], VisualInput(features))


def run(model, prepared, **kw) -> list[int]:
    params = GenerationParams(**kw)
    return list(generate_tokens(model.llm, prepared.inputs_embeds, params, eos_id=model.tokenizer.eos_id))


def test_greedy_equals_an_argmax_loop_without_cache(tiny_model, prepared) -> None:
    steps = 6
    ids = run(tiny_model, prepared, max_new_tokens=steps)
    embed = tiny_model.llm.get_input_embeddings()
    seq, expected = prepared.inputs_embeds, []
    with torch.inference_mode():
        for _ in range(steps):
            logits = tiny_model.llm(inputs_embeds=seq, use_cache=False).logits[0, -1]  # whole sequence, no cache
            nxt = int(logits.argmax())
            expected.append(nxt)
            if nxt == tiny_model.tokenizer.eos_id:
                break
            seq = torch.cat((seq, embed(torch.tensor([[nxt]]))), 1)
    assert ids == expected


def test_stream_deltas_concatenate_to_the_decoded_text(tiny_model, prepared) -> None:
    deltas = list(tiny_model.stream(prepared, GenerationParams(max_new_tokens=24)))
    ids = [d.token_id for d in deltas]
    assert ids == run(tiny_model, prepared, max_new_tokens=24)
    assert "".join(d.text for d in deltas) == tiny_model.tokenizer.decode(ids)
    assert all(d.finish_reason is None for d in deltas[:-1]) and deltas[-1].finish_reason in ("stop", "length")


def test_max_new_tokens_gives_length(tiny_model, prepared) -> None:
    ids = run(tiny_model, prepared, max_new_tokens=5)
    assert tiny_model.tokenizer.eos_id not in ids  # this seed's model does not stop within 5 tokens
    deltas = list(tiny_model.stream(prepared, GenerationParams(max_new_tokens=5)))
    assert len(deltas) == 5 and deltas[-1].finish_reason == "length"


def test_eos_gives_stop(tiny_checkpoint: Path, prepared) -> None:
    """Make EOS the most likely first token: generation ends on it with finish_reason 'stop'."""
    model = load_llamavid(tiny_checkpoint)  # a private copy: its LM head is edited
    eos = model.tokenizer.eos_id
    with torch.inference_mode():
        hidden = model.llm.model(inputs_embeds=prepared.inputs_embeds).last_hidden_state[0, -1]
        model.llm.lm_head.weight[eos] = hidden * (100.0 / hidden.norm() ** 2)  # logit 100 for EOS
    deltas = list(model.stream(prepared, GenerationParams(max_new_tokens=8)))
    assert [d.token_id for d in deltas] == [eos]
    assert deltas[-1].finish_reason == "stop" and deltas[-1].text == ""


def test_seeded_sampling(tiny_model, prepared) -> None:
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=0, top_p=1.0)
    a = run(tiny_model, prepared, seed=1, **kw)
    assert a == run(tiny_model, prepared, seed=1, **kw)
    others = [run(tiny_model, prepared, seed=s, **kw) for s in (2, 3)]
    assert any(o != a for o in others)
    assert a != run(tiny_model, prepared, max_new_tokens=10)  # and it is not greedy


@pytest.mark.parametrize("controls", [dict(top_k=1, top_p=1.0), dict(top_k=0, top_p=1e-6)])
def test_narrow_sampling_equals_greedy(tiny_model, prepared, controls: dict) -> None:
    greedy = run(tiny_model, prepared, max_new_tokens=8)
    for seed in (0, 1):
        assert run(tiny_model, prepared, max_new_tokens=8, temperature=1.5, seed=seed, **controls) == greedy


def test_stop_string_cuts_the_stream(tiny_model, prepared) -> None:
    full_deltas = list(tiny_model.stream(prepared, GenerationParams(max_new_tokens=20)))
    full = "".join(d.text for d in full_deltas)
    # A stop string taken from the middle of the greedy answer (first occurrence, printable text).
    k = next(k for k in range(3, len(full) - 3)
             if full[k:k + 3].isprintable() and "\ufffd" not in full[k:k + 3] and full.find(full[k:k + 3]) == k)
    stop = full[k:k + 3]
    deltas = list(tiny_model.stream(prepared, GenerationParams(max_new_tokens=20, stop=(stop,))))
    assert "".join(d.text for d in deltas) == full[:k]
    assert deltas[-1].finish_reason == "stop" and len(deltas) < len(full_deltas)
    assert [d.token_id for d in deltas] == [d.token_id for d in full_deltas[:len(deltas)]]


def test_prompt_longer_than_the_context(tiny_model) -> None:
    prepared = tiny_model.prepare([Message("user", "kitchen " * (tiny_model.context_length + 10))])
    assert prepared.num_prompt_tokens > tiny_model.context_length
    with pytest.raises(ValueError, match="context"):
        list(tiny_model.stream(prepared, GenerationParams(max_new_tokens=4)))


def test_budget_clamps_to_the_context() -> None:
    params = GenerationParams(max_new_tokens=100)
    assert with_budget(params, 2040, 2048).max_new_tokens == 8
    assert with_budget(params, 10, 2048).max_new_tokens == 100
    with pytest.raises(ValueError):
        with_budget(params, 2048, 2048)


# -- the sampler on its own ------------------------------------------------------------------------
def _draws(logits: torch.Tensor, n: int = 400, **kw) -> set[int]:
    g = torch.Generator().manual_seed(0)
    params = GenerationParams(temperature=1.0, **kw)
    return {sample(logits, params, g) for _ in range(n)}


def test_top_k_and_top_p_semantics() -> None:
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = probs.log()
    assert _draws(logits, top_k=0, top_p=1.0) == {0, 1, 2, 3, 4}
    assert _draws(logits, top_k=2, top_p=1.0) == {1, 3}
    # transformers 4.31 top-p: drop the smallest tokens whose cumulative mass is <= 1 - top_p.
    # Ascending: 0.05, 0.1, 0.15, 0.3, 0.4 -> cumulative 0.05, 0.15, 0.30, 0.60, 1.0.
    assert _draws(logits, top_k=0, top_p=0.7) == {1, 3}  # 0.30 <= 0.3 removed: {0, 2, 4}
    assert _draws(logits, top_k=0, top_p=0.71) == {1, 3, 4}
    assert _draws(logits, top_k=3, top_p=0.5) == {1, 3}  # top-k first, then top-p over the renormalised rest
    assert sample(logits, GenerationParams(temperature=0.0), None) == 1


def test_temperature_sharpens() -> None:
    logits = torch.tensor([0.0, 0.5, 1.0])
    g = torch.Generator().manual_seed(0)
    cold = [sample(logits, GenerationParams(temperature=0.05, top_k=0), g) for _ in range(200)]
    hot = [sample(logits, GenerationParams(temperature=5.0, top_k=0), g) for _ in range(200)]
    assert cold.count(2) > 190 and hot.count(2) < 120


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0),
                                 dict(top_p=1.5), dict(top_k=-1)])
def test_invalid_params(bad: dict) -> None:
    with pytest.raises(ValueError):
        GenerationParams(**bad).validate()


def test_generation_config_defaults(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """generation_config.json has temperature/top_p but no do_sample: plain requests are greedy."""
    raw = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    defaults = GenerationDefaults.from_dir(tiny_checkpoint)
    assert defaults.top_p == raw["top_p"] and defaults.sampling_temperature == raw["temperature"]
    plain = defaults.apply(temperature=None, top_p=None)
    assert plain.greedy and plain.top_p == raw["top_p"] and plain.top_k == 50
    asked = defaults.apply(temperature=0.2, top_p=0.7, max_new_tokens=64, stop=None)
    assert (asked.temperature, asked.top_p, asked.max_new_tokens) == (0.2, 0.7, 64)
    assert GenerationDefaults.from_dir(tmp_path) == GenerationDefaults()  # no file: the released values
    assert (GenerationDefaults().sampling_temperature, GenerationDefaults().top_p) == (0.9, 0.6)
