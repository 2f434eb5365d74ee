"""Incremental detokenization: streamed deltas equal a one-shot decode; stop strings never leak."""

from __future__ import annotations

import random

import pytest

from model.detokenize import IncrementalDetokenizer

TEXTS = [
    "the man is cooking in the kitchen.",
    "café naïve 😀 end",
    "é",
    "😀😀 x",
    "日本語のテキスト, and 🎉 at the end 🎉",
]


def stream(tokenizer, ids: list[int], stop=()) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, stop)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.finish())
    return deltas, detok


@pytest.mark.parametrize("text", TEXTS)
def test_byte_fallback_characters(tiny_model, text: str) -> None:
    tok = tiny_model.tokenizer
    ids = tok.encode(text, add_bos=False)
    if text != TEXTS[0]:  # the multi-byte characters really are spelled as byte pieces
        assert any(tok.sp.is_byte(i) for i in ids)
    deltas, _ = stream(tok, ids)
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == text == tok.decode(ids)


def test_held_back_until_the_character_is_complete(tiny_model) -> None:
    tok = tiny_model.tokenizer
    ids = tok.encode("😀", add_bos=False)
    byte_ids = [i for i in ids if tok.sp.is_byte(i)]
    assert len(byte_ids) == 4
    deltas, _ = stream(tok, ids)
    assert deltas[-2] == "😀" and "".join(deltas[:-2]) == ""


@pytest.mark.parametrize("seed", range(6))
def test_random_ids_match_one_shot_decode(tiny_model, seed: int) -> None:
    """Any id sequence (stray bytes, invalid UTF-8, specials) streams to exactly ``decode(ids)``."""
    tok = tiny_model.tokenizer
    rng = random.Random(seed)
    ids = [rng.randrange(tok.vocab_size) for _ in range(60)]
    deltas, _ = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids)


def test_truncated_character_is_flushed_at_the_end(tiny_model) -> None:
    tok = tiny_model.tokenizer
    ids = tok.encode("ok é", add_bos=False)[:-1]  # generation stopped inside "é"
    deltas, _ = stream(tok, ids)
    assert "\ufffd" not in "".join(deltas[:-1])
    assert "".join(deltas) == tok.decode(ids)


def _stop_case(tiny_model, text: str, stop: list[str]) -> tuple[str, IncrementalDetokenizer, int]:
    tok = tiny_model.tokenizer
    ids = tok.encode(text, add_bos=False)
    detok = IncrementalDetokenizer(tok, stop)
    out, used = "", 0
    for i in ids:
        out += detok.add(i)
        used += 1
        if detok.stopped:
            break
    out += detok.finish()
    return out, detok, used


def test_stop_string_spanning_tokens(tiny_model) -> None:
    text = "a man runs. a man walks away from the kitchen"
    out, detok, used = _stop_case(tiny_model, text, ["man walks"])
    assert detok.stopped and out == "a man runs. a "
    assert used < len(tiny_model.tokenizer.encode(text, add_bos=False))  # stopped early


def test_partial_stop_is_released_when_it_does_not_complete(tiny_model) -> None:
    tok = tiny_model.tokenizer
    ids = tok.encode("the man runs", add_bos=False)
    detok = IncrementalDetokenizer(tok, ["man walks"])
    shown, held = "", False
    for k, i in enumerate(ids):
        shown += detok.add(i)
        if tok.decode(ids[: k + 1]).endswith("man"):
            assert shown == "the "  # "man" could still become "man walks": held back
            held = True
    assert held
    assert shown + detok.finish() == "the man runs"  # released once it could no longer match
    assert not detok.stopped


def test_earliest_stop_wins_and_nothing_after(tiny_model) -> None:
    out, detok, _ = _stop_case(tiny_model, "one two three four", ["four", "two"])
    assert out == "one " and detok.stopped
    assert detok.add(5) == "" and detok.finish() == ""


def test_stop_at_the_start(tiny_model) -> None:
    out, detok, used = _stop_case(tiny_model, "the end of it", ["the"])
    assert out == "" and detok.stopped and used == len(tiny_model.tokenizer.encode("the", add_bos=False))


def test_stop_with_multibyte_characters(tiny_model) -> None:
    out, _, _ = _stop_case(tiny_model, "café 😀 stop here 😀", ["stop"])
    assert out == "café 😀 "
