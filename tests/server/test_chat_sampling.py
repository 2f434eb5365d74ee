"""Sampling outputs through the unmodified openai client against a real ``llamavid serve`` (tiny
checkpoint): log-probabilities equal the model's own, n answers come from one prefill, penalties
reach the decoder. The answers of a random model are noise; the numbers are not."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
import torch

from model.conversation import Message
from model.generate import GenerationParams
from tests.server.live import scrape

QUESTION = "Describe a red ball rolling across a table."


def _direct_greedy(model, question: str, steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy ids and every position's log-probabilities from plain forward passes over the prompt and
    the answer so far (no KV cache, no batching)."""
    prepared = model.prepare([Message("user", question)])
    embed = model.llm.get_input_embeddings()
    ids: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            answer = embed(torch.tensor([ids], dtype=torch.long)) if ids else prepared.inputs_embeds[:, :0]
            logits = model.llm(inputs_embeds=torch.cat((prepared.inputs_embeds, answer), dim=1)).logits[0]
            ids.append(int(logits[-1].argmax()))
        logp = torch.log_softmax(logits[prepared.num_prompt_tokens - 1 :].float(), dim=-1)
    return ids, logp


def test_logprobs_match_a_direct_forward_pass(openai_client, tiny_model) -> None:
    completion = openai_client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=3)
    choice = completion.choices[0]
    entries = choice.logprobs.content
    ids, logp = _direct_greedy(tiny_model, QUESTION, len(entries))
    assert completion.usage.prompt_tokens == tiny_model.prepare([Message("user", QUESTION)]).num_prompt_tokens
    assert len(entries) == completion.usage.completion_tokens - (choice.finish_reason == "stop")
    for step, entry in enumerate(entries):
        token = ids[step]
        assert bytes(entry.bytes) == tiny_model.tokenizer.token_bytes(token)
        assert entry.logprob == pytest.approx(float(logp[step, token]), abs=1e-4)
        top = logp[step].topk(3)
        assert [bytes(t.bytes) for t in entry.top_logprobs] == [tiny_model.tokenizer.token_bytes(int(i))
                                                                 for i in top.indices]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", errors="replace") == choice.message.content


def test_streamed_logprobs_cover_every_token(openai_client) -> None:
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=6, temperature=0,
                  logprobs=True, top_logprobs=2)
    whole = openai_client.chat.completions.create(**kwargs).choices[0].logprobs.content
    chunks = list(openai_client.chat.completions.create(**kwargs, stream=True))
    streamed = [e for c in chunks for choice in c.choices if choice.logprobs for e in choice.logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in whole]
    assert all(len(e.top_logprobs) == 2 for e in streamed)


def test_n_answers_share_one_prefill(openai_client, server) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    before = scrape(server.url)
    completion = openai_client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=1.0, seed=7, n=3, logprobs=True)
    after = scrape(server.url)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert len({c.message.content for c in completion.choices}) == 3  # seeds 7, 8, 9
    # the prompt went through the LLM once, not three times
    assert before.delta(after, "llamavid_prefill_positions_total") == completion.usage.prompt_tokens
    generated = sum(len(c.logprobs.content) + (c.finish_reason == "stop") for c in completion.choices)
    assert completion.usage.completion_tokens == generated
    alone = openai_client.chat.completions.create(model="tiny", messages=messages, max_tokens=8,
                                                  temperature=1.0, seed=7)
    assert alone.choices[0].message.content == completion.choices[0].message.content

    chunks = list(openai_client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=1.0, seed=7, n=3, stream=True))
    text = {i: "" for i in range(3)}
    finishes = {i: 0 for i in range(3)}
    for chunk in chunks:
        for choice in chunk.choices:
            text[choice.index] += choice.delta.content or ""
            finishes[choice.index] += choice.finish_reason is not None
    assert [text[i] for i in range(3)] == [c.message.content for c in completion.choices]
    assert finishes == {0: 1, 1: 1, 2: 1}


def test_penalties_reach_the_decoder(openai_client, tiny_model) -> None:
    """The served answer with penalties is the one the model's own decoding loop gives with them."""
    penalties = dict(repetition_penalty=1.8, frequency_penalty=1.2, presence_penalty=0.5)
    served = openai_client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0,
        frequency_penalty=penalties["frequency_penalty"], presence_penalty=penalties["presence_penalty"],
        extra_body={"repetition_penalty": penalties["repetition_penalty"]}).choices[0].message.content
    prepared = tiny_model.prepare([Message("user", QUESTION)])
    expected = "".join(d.text for d in tiny_model.stream(
        prepared, GenerationParams(max_new_tokens=12, **penalties)))
    plain = "".join(d.text for d in tiny_model.stream(prepared, GenerationParams(max_new_tokens=12)))
    assert served == expected and expected != plain


@pytest.mark.parametrize("body, needle", [
    ({"n": 9}, "n"),
    ({"top_logprobs": 3}, "top_logprobs needs logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "exactly one"),
    ({"structured_outputs": {"grammar": "root ::= 'a'"}}, "grammar"),
    ({"response_format": {"type": "json_schema"}}, "json_schema"),
])
def test_bad_sampling_fields_are_400s_naming_them(http: httpx.Client, body: dict, needle: str) -> None:
    response = http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]["message"]


def test_openai_client_surfaces_the_400(openai_client) -> None:
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        openai_client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              top_logprobs=2, max_tokens=2)


# -- structured output --------------------------------------------------------------------------------
SHAPE_SCHEMA = {"type": "object", "properties": {
    "colour": {"type": "string", "enum": ["red", "green", "blue"]},
    "shape": {"type": "string", "enum": ["circle", "square"]},
    "moving": {"type": "boolean"}}, "required": ["colour", "shape", "moving"], "additionalProperties": False}


def test_a_json_schema_answer_always_parses_even_from_noise(openai_client) -> None:
    """The tiny model's answers are noise; under the grammar every one of them is schema-valid JSON,
    streamed or not, for each of n answers."""
    response_format = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SHAPE_SCHEMA}}
    completion = openai_client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=120, temperature=1.0,
        seed=1, n=4, response_format=response_format)
    answers = [json.loads(c.message.content) for c in completion.choices]
    for answer in answers:
        assert list(answer) == ["colour", "shape", "moving"]  # in the schema's order
        assert answer["colour"] in ("red", "green", "blue") and answer["shape"] in ("circle", "square")
        assert isinstance(answer["moving"], bool)
    assert all(c.finish_reason == "stop" for c in completion.choices)
    text = "".join(c.choices[0].delta.content or "" for c in openai_client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=120, temperature=1.0, seed=1,
        response_format=response_format, stream=True) if c.choices)
    assert json.loads(text) == answers[0]


def test_vllm_choice_and_regex(openai_client) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    for seed in range(3):
        choice = openai_client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=10, temperature=1.0, seed=seed,
            extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe so"]}}).choices[0].message.content
        assert choice in ("yes", "no", "maybe so")
        code = openai_client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=10, temperature=1.0, seed=seed,
            extra_body={"structured_outputs": {"regex": "[A-Z][0-9]{3}"}}).choices[0].message.content
        assert re.fullmatch("[A-Z][0-9]{3}", code), code


@pytest.mark.parametrize("response_format, needle", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}, "uniqueItems"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "sandwich"}}}, "json_schema"),
])
def test_an_unenforceable_schema_is_a_400_naming_it(http: httpx.Client, response_format: dict, needle: str) -> None:
    response = http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "response_format": response_format})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_response_format" and needle in error["message"], error


def test_bad_regex_is_a_400(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "structured_outputs": {"regex": "([a-z"}})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_response_format"
