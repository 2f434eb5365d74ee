"""Conversation templates, LLaMA / Q-Former tokenization, and splicing the visual tokens (spec §4.3, §5)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from model.conversation import Message, build_prompt, get_template
from model.llama_vid import VisualInput
from model.loader import load_llamavid
from model.tokenizer import IMAGE_TOKEN_INDEX
from tests.model.checkpoints import clone, edit_config
from tests.model.test_parity import CASES

USER_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the user's questions.")
HUMAN_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")
MOVIE_HEAD = "Below is a movie. Memorize the content and answer my question after watching this movie."
MOVIE_TAIL = "Now the movie end."


# -- templates -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "system"), [("vicuna_v1", USER_SYSTEM), ("imgsp_v1", USER_SYSTEM),
                                              ("llava_v1", HUMAN_SYSTEM)])
def test_templates(name: str, system: str) -> None:
    t = get_template(name)
    one = [Message("user", "What is he doing?")]
    assert build_prompt(t, one) == f"{system} USER: <image>\nWhat is he doing? ASSISTANT:"
    assert build_prompt(t, one, image_text="") == f"{system} USER: What is he doing? ASSISTANT:"
    chat = [Message("user", "Q1"), Message("assistant", "A1"), Message("user", "Q2"), Message("assistant", "A2"),
            Message("user", "Q3")]
    assert build_prompt(t, chat) == (
        f"{system} USER: Q1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>USER: <image>\nQ3 ASSISTANT:")
    assert build_prompt(t, chat, image_turn="first") == (
        f"{system} USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>USER: Q3 ASSISTANT:")


@pytest.mark.parametrize("messages", [[], [Message("assistant", "hi")], [Message("user", "a"), Message("user", "b")],
                                      [Message("user", "a"), Message("assistant", "b")]])
def test_bad_conversations(messages) -> None:
    with pytest.raises(ValueError):
        build_prompt(get_template("vicuna_v1"), messages)


def test_unknown_template() -> None:
    with pytest.raises(ValueError, match="llava_llama_2"):
        get_template("llava_llama_2")  # named by the official cli.py, never defined


def test_prompts_of_the_reference_cases() -> None:
    for case_dir in CASES:
        case = json.loads((case_dir / "case.json").read_text())
        prompt = build_prompt(get_template(case["template"]), [Message("user", case["question"])])
        assert prompt == case["prompt"], case_dir.name


# -- LLaMA tokenization ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sp(tiny_checkpoint: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tiny_checkpoint / "tokenizer.model"))


def test_image_chunks(tiny_model, sp) -> None:
    prompt = build_prompt(get_template("vicuna_v1"), [Message("user", "What is the man doing?")])
    head, tail = prompt.split("<image>")
    ids = tiny_model.tokenizer.encode_with_images(prompt)
    # Each chunk encoded on its own (own dummy prefix), BOS once, one -200 between chunks.
    assert ids == [sp.bos_id(), *sp.encode(head), IMAGE_TOKEN_INDEX, *sp.encode(tail)]
    assert ids.count(sp.bos_id()) == 1 and ids.count(IMAGE_TOKEN_INDEX) == 1
    assert sp.id_to_piece(ids[ids.index(IMAGE_TOKEN_INDEX) + 1]).startswith("\u2581")  # "\nWhat" gets "▁"


def test_image_in_the_middle_and_adjacent(tiny_model, sp) -> None:
    ids = tiny_model.tokenizer.encode_with_images("a dog <image> and a cat <image><image> end")
    assert ids == [sp.bos_id(), *sp.encode("a dog "), IMAGE_TOKEN_INDEX, *sp.encode(" and a cat "),
                   IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, *sp.encode(" end")]
    assert tiny_model.tokenizer.encode_with_images("<image>") == [sp.bos_id(), IMAGE_TOKEN_INDEX]


def test_eos_in_history(tiny_model, sp) -> None:
    """``</s>`` in a multi-turn history is the EOS id, and the text after it gets a dummy prefix."""
    chat = [Message("user", "Q one"), Message("assistant", "the dog runs"), Message("user", "and the cat")]
    prompt = build_prompt(get_template("vicuna_v1"), chat)
    ids = tiny_model.tokenizer.encode_with_images(prompt)
    head, tail = prompt.split("<image>")
    before, after = head.split("</s>")
    assert ids == [sp.bos_id(), *sp.encode(before), sp.eos_id(), *sp.encode(after), IMAGE_TOKEN_INDEX,
                   *sp.encode(tail)]
    eos_at = ids.index(sp.eos_id())
    assert sp.id_to_piece(ids[eos_at + 1]).startswith("\u2581")
    assert ids.count(sp.eos_id()) == 1  # the literal "</s>" was not spelled out as "<", "/", "s", ">"


def test_decode_skips_specials(tiny_model, sp) -> None:
    ids = [sp.bos_id(), *sp.encode("the dog"), sp.eos_id()]
    assert tiny_model.tokenizer.decode(ids) == "the dog"


# -- Q-Former tokenizer ----------------------------------------------------------------------------
def test_qformer_left_truncation(tiny_model) -> None:
    tok = tiny_model.qformer_tokenizer
    words = ["dog"] * 300 + ["red", "ball", "kitchen"] + ["cat"] * 97  # 400 words, one piece each
    text = tok([" ".join(words)])
    ids = text.input_ids[0].tolist()
    assert len(ids) == 256 and text.attention_mask.sum() == 256
    pieces = tok._tok.convert_ids_to_tokens(ids)
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    assert pieces[1:-1] == words[-254:]  # the *end* of the question survives


def test_qformer_tokenizer_vocab(tiny_model, tiny_checkpoint: Path) -> None:
    tok = tiny_model.qformer_tokenizer
    base = len((tiny_checkpoint / "qformer_tokenizer" / "vocab.txt").read_text().split())
    assert len(tok) == base + 1 == tiny_model.config.qformer.vocab_size
    assert tok._tok.convert_tokens_to_ids("[DEC]") == base
    a, b = tok(["What IS the Man doing?"]), tok(["what is the man doing?"])
    assert torch.equal(a.input_ids, b.input_ids)  # uncased
    assert base not in a.input_ids  # [DEC] only grows the vocabulary; it is never inserted


# -- splicing --------------------------------------------------------------------------------------
def _embed(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model.llm.get_input_embeddings()(torch.tensor(ids))


def test_short_video_splice(tiny_model, tiny_frames) -> None:
    features = tiny_model.encode_frames(tiny_model.preprocess(tiny_frames))
    q = "What is the man doing?"
    prepared = tiny_model.prepare([Message("user", q)], VisualInput(features, "video"))
    tokens = tiny_model.frame_tokens(features, q).tokens
    ids = prepared.input_ids
    j = ids.index(IMAGE_TOKEN_INDEX)
    n = len(tiny_frames) * 2
    assert prepared.num_visual_tokens == n
    assert prepared.inputs_embeds.shape == (1, len(ids) - 1 + n, tiny_model.config.hidden_size)
    e = prepared.inputs_embeds[0]
    torch.testing.assert_close(e[:j], _embed(tiny_model, ids[:j]))
    torch.testing.assert_close(e[j:j + n], tokens)
    torch.testing.assert_close(e[j + n:], _embed(tiny_model, ids[j + 1:]))


def test_question_of_the_image_turn(tiny_model, tiny_frames) -> None:
    features = tiny_model.encode_frames(tiny_model.preprocess(tiny_frames[:1]))
    chat = [Message("user", "where is the dog?"), Message("assistant", "in the kitchen"),
            Message("user", "what colour is the car?")]
    for turn, question in (("last", "what colour is the car?"), ("first", "where is the dog?")):
        prepared = tiny_model.prepare(chat, VisualInput(features, "image"), image_turn=turn)
        j = prepared.input_ids.index(IMAGE_TOKEN_INDEX)
        expected = tiny_model.frame_tokens(features, question).tokens
        torch.testing.assert_close(prepared.inputs_embeds[0, j:j + 2], expected)


def test_text_only(tiny_model) -> None:
    prepared = tiny_model.prepare([Message("user", "hello there")])
    assert IMAGE_TOKEN_INDEX not in prepared.input_ids and prepared.num_visual_tokens == 0
    torch.testing.assert_close(prepared.inputs_embeds[0], _embed(tiny_model, prepared.input_ids))


def test_placeholder_count_must_match(tiny_model) -> None:
    with pytest.raises(ValueError, match="placeholder"):
        tiny_model.splice_embeddings([1, IMAGE_TOKEN_INDEX, 5, IMAGE_TOKEN_INDEX], [torch.zeros(2, 64)])


# -- long-video mode -------------------------------------------------------------------------------
def _check_long_video(model, features: torch.Tensor, question: str) -> None:
    t = features.shape[0]
    seen: list[torch.Size] = []
    handle = model.qformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states"].shape), with_kwargs=True)
    try:
        prepared = model.prepare([Message("user", question)], VisualInput(features, "video"))
    finally:
        handle.remove()
    # Stage-3 framing, two placeholders per frame (spec §6.2).
    assert prepared.prompt == (f"{USER_SYSTEM} USER: {MOVIE_HEAD}{'<image>' * (2 * t)}{MOVIE_TAIL}\n{question}"
                               " ASSISTANT:")
    assert prepared.prompt.count("<image>") == 2 * t
    ids = prepared.input_ids
    slots = [i for i, x in enumerate(ids) if x == IMAGE_TOKEN_INDEX]
    assert len(slots) == 2 * t and slots == list(range(slots[0], slots[0] + 2 * t))
    # CLS dropped before the Q-Former: it sees the 16 patches only.
    assert seen == [torch.Size((t, 16, model.config.mm_hidden_size))]
    # One visual token per placeholder, in order: the sequence keeps the prompt's length.
    e = prepared.inputs_embeds[0]
    assert e.shape[0] == len(ids) and prepared.num_visual_tokens == 2 * t
    tokens = model.frame_tokens(features[:, 1:], question).tokens
    torch.testing.assert_close(e[slots], tokens)
    text = [i for i, x in enumerate(ids) if x != IMAGE_TOKEN_INDEX]
    torch.testing.assert_close(e[text], _embed(model, [ids[i] for i in text]))


def test_long_video_mode_flag(tiny_checkpoint: Path, tiny_frames) -> None:
    model = load_llamavid(tiny_checkpoint)
    assert not model.config.long_video
    model.config = replace(model.config, video_mode="long")
    features = model.encode_frames(model.preprocess(tiny_frames))
    _check_long_video(model, features, "What happens at the end?")
    # An image is never a movie, even for a long-video model.
    prepared = model.prepare([Message("user", "what?")], VisualInput(features[:1], "image"))
    assert prepared.input_ids.count(IMAGE_TOKEN_INDEX) == 1 and MOVIE_HEAD not in prepared.prompt


def test_long_video_from_rope_scaled_config(tiny_checkpoint: Path, tiny_frames, tmp_path: Path) -> None:
    ckpt = clone(tiny_checkpoint, tmp_path / "ckpt")
    edit_config(ckpt, rope_scaling={"type": "linear", "factor": 16.0}, compress_type="mean_concat", max_token=65536)
    model = load_llamavid(ckpt)
    assert model.config.long_video and model.context_length == 65536
    features = model.encode_frames(model.preprocess(tiny_frames))
    _check_long_video(model, features, "Who is the man?")
    # "short" overrides the rope-scaling heuristic.
    model.config = replace(model.config, video_mode="short")
    prepared = model.prepare([Message("user", "Who?")], VisualInput(features, "video"))
    assert prepared.input_ids.count(IMAGE_TOKEN_INDEX) == 1 and MOVIE_HEAD not in prepared.prompt


def test_long_video_drops_cls_for_an_odd_patch_grid(tmp_path: Path) -> None:
    """98 px -> 7x7 = 49 patches, so CLS + patches is *even*: the movie path must still drop CLS
    (the official loader always takes ``feats[:, 1:]``), and the visual head's odd-count rule then
    applies to the 49 remaining tokens as it would in the official code."""
    from model.tools.tiny import make_tiny

    model = load_llamavid(make_tiny(tmp_path / "tiny-98", "tiny", image_size=98, num_shards=1))
    model.config = replace(model.config, video_mode="long")
    frames = torch.randint(0, 256, (2, 98, 98, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features = model.encode_frames(model.preprocess(frames))
    assert features.shape[1] == 50
    seen: list[torch.Size] = []
    handle = model.qformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states"].shape), with_kwargs=True)
    try:
        prepared = model.prepare([Message("user", "who?")], VisualInput(features, "video"))
    finally:
        handle.remove()
    assert seen == [torch.Size((2, 49, model.config.mm_hidden_size))]
    assert prepared.input_ids.count(IMAGE_TOKEN_INDEX) == 4
    slots = [i for i, x in enumerate(prepared.input_ids) if x == IMAGE_TOKEN_INDEX]
    torch.testing.assert_close(prepared.inputs_embeds[0, slots], model.frame_tokens(features[:, 1:], "who?").tokens)
