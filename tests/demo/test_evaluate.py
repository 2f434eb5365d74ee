"""Evaluation plumbing: ablations applied from outside the model, the real decode path, the table."""

from __future__ import annotations

import pytest
import torch

from model.demo import data
from model.demo.evaluate import (
    ABLATIONS,
    JsonRecord,
    ModelAnswerer,
    Record,
    ablated,
    encode_file,
    json_summary,
    markdown_table,
    normalise,
    prepare,
    run_eval,
    summarise,
    time_breakdown,
)
from model.demo.train import build_demo_model

from .test_train import SMOKE_SPEC

QUESTION = "What colour is the circle?"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    model, _, _ = build_demo_model(folder, SMOKE_SPEC, seed=0)
    ex = data.make_example(11, "binding")
    features = encode_file(model, data.write_clip(ex.scene, folder / "clip.mp4"))
    assert len(features) == ex.scene.num_frames
    return model, features


def test_zeroing_a_token_touches_only_that_token(small):
    model, features = small
    full = model.frame_tokens(features, QUESTION).tokens
    with ablated(model, ABLATIONS["no_context"], QUESTION):
        no_ctx = model.frame_tokens(features, QUESTION).tokens
    with ablated(model, ABLATIONS["no_content"], QUESTION):
        no_cnt = model.frame_tokens(features, QUESTION).tokens
    assert not no_ctx[0::2].any() and torch.equal(no_ctx[1::2], full[1::2])
    assert not no_cnt[1::2].any() and torch.equal(no_cnt[0::2], full[0::2])
    assert torch.equal(model.frame_tokens(features, QUESTION).tokens, full)  # the hook is gone


def test_blank_qformer_question_changes_only_the_context_token(small):
    model, features = small
    original = model.qformer_tokenizer
    blank = model.frame_tokens(features, "").tokens
    with ablated(model, ABLATIONS["qformer_blank"], QUESTION):
        got = model.frame_tokens(features, QUESTION).tokens
    assert model.qformer_tokenizer is original
    torch.testing.assert_close(got, blank)
    assert not torch.allclose(got[0::2], model.frame_tokens(features, QUESTION).tokens[0::2])


def test_prompt_and_qformer_text_are_set_independently(small):
    model, features = small
    full = prepare(model, features, QUESTION)
    prompt_blank = prepare(model, features, QUESTION, ABLATIONS["prompt_blank"])
    both = prepare(model, features, QUESTION, ABLATIONS["both_blank"])
    assert QUESTION in full.prompt and QUESTION not in prompt_blank.prompt and QUESTION not in both.prompt
    n = full.num_visual_tokens
    visual = lambda p: p.inputs_embeds[0, p.input_ids.index(-200) : p.input_ids.index(-200) + n]
    torch.testing.assert_close(visual(prompt_blank), visual(full))  # the Q-Former still read the question
    assert not torch.allclose(visual(both)[0::2], visual(full)[0::2])


def test_the_model_answerer_goes_through_stream(small, monkeypatch):
    model, features = small
    streamed = []
    real_stream = model.stream
    monkeypatch.setattr(model, "stream", lambda *a: streamed.append(1) or real_stream(*a))
    text = ModelAnswerer(model, max_new_tokens=3).answer(features, QUESTION)
    assert isinstance(text, str) and streamed == [1]


def test_run_eval_covers_every_type_and_condition(small):
    model, _ = small
    records = run_eval(model, seed=3, per_type=1, ablations=["full", "no_context"])
    assert {r.qtype for r in records} == set(data.QUESTION_TYPES)
    assert all(set(r.answers) == {"full", "no_context"} for r in records)
    summary = summarise(records)
    assert set(summary) == {"full", "no_context"} and 0 <= summary["full"]["overall"] <= 1


def test_summary_and_table():
    records = [
        Record(1, "binding", "What colour is the circle?", "red", 2, {"full": " Red.", "no_context": "blue"}),
        Record(2, "binding", "What colour is the square?", "blue", 2, {"full": "blue", "no_context": "blue"}),
        Record(3, "counting", "How many shapes are there?", "two", 2, {"full": "two", "no_context": "three"}),
    ]
    assert normalise(" Red.") == "red"
    summary = summarise(records)
    assert summary["full"] == {"binding": 1.0, "counting": 1.0, "mean_of_types": 1.0, "overall": 1.0}
    assert summary["no_context"]["binding"] == 0.5 and summary["no_context"]["counting"] == 0.0
    table = markdown_table(summary, records)
    assert "| full: both tokens" in table and "binding (n=2)" in table and "50.0" in table


def test_time_questions_are_counted_by_kind():
    records = [
        Record(1, "time", "What appears at the end?", "circle", 2, {"full": "circle", "no_context": "square"}),
        Record(2, "time", "What disappears?", "square", 2, {"full": "circle", "no_context": "square"}),
        Record(3, "time", "Which way does the square move?", "left", 1, {"full": "Left.", "no_context": "up"}),
        Record(4, "time", "Which way does the circle move?", "up", 1, {"full": "down", "no_context": "up"}),
        Record(5, "binding", "What colour is the circle?", "red", 2, {"full": "red", "no_context": "red"}),
    ]
    assert time_breakdown(records) == {"appears": {"right": 1, "asked": 1}, "disappears": {"right": 0, "asked": 1},
                                       "direction": {"right": 1, "asked": 2}}
    assert time_breakdown(records, "no_context")["direction"] == {"right": 1, "asked": 2}
    assert time_breakdown(records, "no_context")["disappears"] == {"right": 1, "asked": 1}


def test_json_summary_counts_parsing_and_right_answers():
    expected = {"colour": "red", "shape": "circle"}
    answers = ['{"colour": "red", "shape": "circle"}', '{"shape": "circle", "colour": "red"}',
               '{"colour": "blue", "shape": "circle"}', '{"colour": "red", "shape": ', "red"]
    summary = json_summary([JsonRecord(0, "Which shape is red? Answer in JSON.", expected, a) for a in answers])
    assert summary.keys() == {"questions", "valid_json", "right_values", "line"}
    assert (summary["questions"], summary["valid_json"], summary["right_values"]) == (5, 3 / 5, 2 / 5)
    assert "(n=5): 60.0 % parse, 40.0 % give both values right" in summary["line"]
