"""Grammar-constrained decoding (``model.structured``) on the bundled demo model's real tokenizer.

The walks pick tokens from seeded random logits under ``mask_logits`` until EOS, so every
token a grammar allows is a token a model could pick: whatever they produce must parse and
validate. A small bias on the closing bytes (``"`` ``}`` ``]``) and EOS keeps random strings
and nesting short, so the file stays fast; it only reorders choices the mask already allowed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch

from model.structured import GrammarCompiler, GrammarMatcher, GrammarSpec, UnsupportedGrammar, mask_logits
from model.tokenizer import LlamaTextTokenizer

TOKENIZER = Path(__file__).resolve().parents[2] / "model" / "demo" / "checkpoint" / "tokenizer.model"
PAD = 8  # LM head rows past the tokenizer's end, as a padded head has

SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0},
        "scene": {
            "type": "object",
            "properties": {"place": {"type": "string", "maxLength": 8}, "indoors": {"type": "boolean"}},
            "required": ["place", "indoors"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["colour", "count", "scene", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer() -> LlamaTextTokenizer:
    return LlamaTextTokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def vocab(tokenizer: LlamaTextTokenizer) -> int:
    return tokenizer.vocab_size + PAD


@pytest.fixture(scope="module")
def compiler(tokenizer: LlamaTextTokenizer, vocab: int) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, vocab, tokenizer.eos_id)


def byte_ids(tokenizer: LlamaTextTokenizer, text: str) -> list[int]:
    """``text`` as byte-fallback pieces: any text, token by token, without the dummy-prefix space."""
    return [tokenizer.sp.piece_to_id(f"<0x{b:02X}>") for b in text.encode()]


def allowed(matcher: GrammarMatcher, vocab: int) -> set[int]:
    logits = torch.zeros(1, vocab)
    mask_logits(logits, [matcher])
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


def walk(tokenizer: LlamaTextTokenizer, vocab: int, matchers: list[GrammarMatcher], seed: int,
         max_steps: int = 3000) -> list[str]:
    """Decode every row from masked random logits until it picks EOS; return each row's text."""
    generator = torch.Generator().manual_seed(seed)
    bias = torch.zeros(vocab)
    bias[[tokenizer.eos_id, *byte_ids(tokenizer, '"}]')]] = 1.5
    ids: list[list[int]] = [[] for _ in matchers]
    done = [False] * len(matchers)
    for _ in range(max_steps):
        logits = torch.randn(len(matchers), vocab, generator=generator) + bias
        mask_logits(logits, [None if d else m for m, d in zip(matchers, done)])
        for row, matcher in enumerate(matchers):
            if done[row]:
                continue
            eos_allowed = bool(torch.isfinite(logits[row, tokenizer.eos_id]))
            assert eos_allowed == matcher.can_end, "EOS must be allowed exactly when the grammar can end"
            assert not torch.isfinite(logits[row, vocab - PAD:]).any(), "ids past the tokenizer are never allowed"
            token = int(logits[row].argmax())
            matcher.accept(token)
            if token == tokenizer.eos_id:
                assert matcher.terminated
                done[row] = True
            else:
                ids[row].append(token)
        if all(done):
            return [tokenizer.decode(row) for row in ids]
    raise AssertionError(f"no EOS within {max_steps} steps")


@pytest.mark.parametrize("seed", range(6))
def test_json_schema_walks_validate(tokenizer, vocab, compiler, seed):
    grammar = compiler.compile(GrammarSpec.json_schema(SCHEMA))
    for text in walk(tokenizer, vocab, [grammar.matcher() for _ in range(4)], seed):
        jsonschema.validate(json.loads(text), SCHEMA)
        assert "\ufffd" not in text  # valid UTF-8 all the way
        assert "\n" not in text and "  " not in text.replace('"  ', "")  # no free whitespace outside strings


@pytest.mark.parametrize("seed", range(4))
def test_json_object_walks_give_objects(tokenizer, vocab, compiler, seed):
    grammar = compiler.compile(GrammarSpec("json_object"))
    for text in walk(tokenizer, vocab, [grammar.matcher() for _ in range(4)], seed):
        assert isinstance(json.loads(text), dict), text


def test_choice_walks_pick_a_choice(tokenizer, vocab, compiler):
    choices = ["yes", "no", "not sure", 'say "hi"', "été"]
    grammar = compiler.compile(GrammarSpec.choice(choices))
    seen = set()
    for seed in range(5):
        texts = walk(tokenizer, vocab, [grammar.matcher() for _ in range(8)], seed)
        assert set(texts) <= set(choices), texts
        seen |= set(texts)
    assert len(seen) >= 3  # the walk really explores the alternatives


def test_regex_walks_fully_match(tokenizer, vocab, compiler):
    pattern = r"[0-9]{3}-[a-z]{2,5}( ok)?"
    grammar = compiler.compile(GrammarSpec("regex", pattern))
    for seed in range(4):
        for text in walk(tokenizer, vocab, [grammar.matcher() for _ in range(8)], seed):
            assert re.fullmatch(pattern, text), text


def test_complete_answer_forces_eos(tokenizer, vocab, compiler):
    matcher = compiler.compile(GrammarSpec.json_schema(SCHEMA)).matcher()
    assert tokenizer.eos_id not in allowed(matcher, vocab)  # nothing yet: EOS may not end it
    text = '{"colour": "red", "count": 3, "scene": {"place": "home", "indoors": true}, "tags": []}'
    for token in byte_ids(tokenizer, text[:-1]):
        matcher.accept(token)
    assert tokenizer.eos_id not in allowed(matcher, vocab) and not matcher.can_end
    matcher.accept(byte_ids(tokenizer, "}")[0])
    assert matcher.can_end and not matcher.terminated
    assert allowed(matcher, vocab) == {tokenizer.eos_id}
    matcher.accept(tokenizer.eos_id)
    assert matcher.terminated
    assert allowed(matcher, vocab) == {tokenizer.eos_id}  # a finished row stays samplable
    with pytest.raises(ValueError, match="after the grammar ended"):
        matcher.accept(byte_ids(tokenizer, " ")[0])


def test_json_strings_never_take_control_characters(tokenizer, vocab, compiler):
    """xgrammar's bounded-length string rule lets raw U+0000..U+001F through; JSON forbids them."""
    controls = [tokenizer.sp.piece_to_id(f"<0x{b:02X}>") for b in range(0x20)]
    for schema in ({"type": "string"}, {"type": "string", "maxLength": 8}, {"type": "string", "minLength": 1}):
        matcher = compiler.compile(GrammarSpec.json_schema(schema)).matcher()
        matcher.accept(byte_ids(tokenizer, '"')[0])
        free = allowed(matcher, vocab)
        assert not free & set(controls) and byte_ids(tokenizer, "a")[0] in free
        with pytest.raises(ValueError, match="control character"):
            matcher.accept(controls[1])
    matcher = compiler.compile(GrammarSpec("regex", "a\tb")).matcher()  # a regex may ask for one
    for token in byte_ids(tokenizer, "a\tb"):
        matcher.accept(token)
    assert matcher.can_end


def test_disallowed_token_is_refused(tokenizer, compiler):
    matcher = compiler.compile(GrammarSpec.choice(["yes", "no"])).matcher()
    with pytest.raises(ValueError, match="not allowed"):
        matcher.accept(byte_ids(tokenizer, "x")[0])
    matcher.accept(byte_ids(tokenizer, "n")[0])  # a refused token leaves the matcher where it was
    with pytest.raises(ValueError, match="not allowed"):
        matcher.accept(tokenizer.eos_id)  # "n" is not a choice yet


def test_batch_leaves_rows_without_matcher_untouched(tokenizer, vocab, compiler):
    json_matcher = compiler.compile(GrammarSpec("json_object")).matcher()
    choice_matcher = compiler.compile(GrammarSpec.choice(["yes", "no"])).matcher()
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    mask_logits(logits, [json_matcher, None, choice_matcher, None])
    assert torch.equal(logits[1], before[1]) and torch.equal(logits[3], before[3])
    # masked rows: the allowed logits keep their values, the rest are -inf, row by row as alone
    for row, matcher in ((0, json_matcher), (2, choice_matcher)):
        alone = allowed(matcher, vocab)
        finite = set(torch.isfinite(logits[row]).nonzero().flatten().tolist())
        assert finite == alone and 0 < len(alone) < vocab
        keep = sorted(alone)
        assert torch.equal(logits[row, keep], before[row, keep])
    # the first piece may carry SentencePiece's dummy-prefix space ("▁yes" decodes to "yes"), but
    # not the byte piece <0x20>, whose space the text would keep
    starts = ("y", "n", "<0x79>", "<0x6E>", "yes", "no")
    assert allowed(choice_matcher, vocab) == {i for i in range(tokenizer.vocab_size)
                                              if tokenizer.sp.id_to_piece(i) in starts
                                              or tokenizer.sp.id_to_piece(i) in ("\u2581", *("\u2581" + p for p in starts))}


def test_padded_head_masks_extra_ids_and_specials(tokenizer, vocab, compiler):
    matcher = compiler.compile(GrammarSpec("json_object")).matcher()
    ids = allowed(matcher, vocab)
    assert ids and max(ids) < tokenizer.vocab_size
    assert not ids & {tokenizer.bos_id, tokenizer.unk_id}
    with pytest.raises(ValueError, match="compiled for"):
        mask_logits(torch.zeros(1, vocab + 1), [matcher])


def test_spec_round_trip_and_cache(compiler):
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    spec = GrammarSpec.json_schema(schema)
    assert GrammarSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert compiler.compile(spec) is compiler.compile(GrammarSpec.json_schema(json.loads(json.dumps(schema))))
    assert GrammarSpec.from_dict({"kind": "json_object"}) == GrammarSpec("json_object", None)
    # property order is the order the answer is written in: not normalised away
    reordered = GrammarSpec.json_schema({"type": "object", "properties": {"a": {"type": "string"},
                                                                          "b": {"type": "integer"}}})
    assert reordered != spec


def test_properties_are_written_in_declared_order(tokenizer, compiler):
    spec = GrammarSpec.json_schema({"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}},
                                    "required": ["a", "b"]})
    matcher = compiler.compile(spec).matcher()
    for token in byte_ids(tokenizer, '{"b": 1, "a": 2}'):
        matcher.accept(token)
    assert matcher.can_end


def test_answers_stay_valid_utf8(tokenizer, compiler):
    """xgrammar lets a surrogate (ED A0 ..) and, in bounded strings, overlong forms through."""
    for spec in (GrammarSpec.json_schema({"type": "string"}), GrammarSpec.json_schema({"type": "string", "maxLength": 5}),
                 GrammarSpec("regex", ".*")):
        for bad in (b"\xed\xa0\x80", b"\xe0\x80\x80", b"\xf0\x80\x80\x80"):
            matcher = compiler.compile(spec).matcher()
            prefix = b'"' if spec.kind == "json_schema" else b""
            with pytest.raises(ValueError, match="not allowed"):
                for byte in prefix + bad:
                    matcher.accept(byte_ids(tokenizer, chr(byte))[0] if byte < 0x80
                                   else tokenizer.sp.piece_to_id(f"<0x{byte:02X}>"))
        matcher = compiler.compile(spec).matcher()
        for token in byte_ids(tokenizer, ('"' if spec.kind == "json_schema" else "") + "é😀"):
            matcher.accept(token)
        lead = tokenizer.sp.piece_to_id("<0xED>")
        matcher.accept(lead)  # after a lead byte the bad second bytes are masked, the good ones not
        free = allowed(matcher, tokenizer.vocab_size + PAD)
        assert tokenizer.sp.piece_to_id("<0x80>") in free and tokenizer.sp.piece_to_id("<0xA0>") not in free


def test_pattern_properties_are_enforced(tokenizer, compiler):
    spec = GrammarSpec.json_schema({"type": "object", "patternProperties": {"^n_[a-z]+$": {"type": "integer"}}})
    good = compiler.compile(spec).matcher()
    for token in byte_ids(tokenizer, '{"n_a": 1}'):
        good.accept(token)
    assert good.can_end
    bad = compiler.compile(spec).matcher()
    with pytest.raises(ValueError, match="not allowed"):
        for token in byte_ids(tokenizer, '{"n_a": "x"}'):
            bad.accept(token)


@pytest.mark.parametrize(("spec", "message"), [
    (GrammarSpec.json_schema({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}),
     "the keyword 'uniqueItems' is not supported"),
    (GrammarSpec.json_schema({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}),
     "the keyword 'not' is not supported .*#/properties/a/not"),
    (GrammarSpec.json_schema({"if": {"type": "integer"}, "then": {"minimum": 5}}), "'if' is not supported"),
    (GrammarSpec.json_schema({"type": "object", "dependentRequired": {"a": ["b"]}}), "'dependentRequired'"),
    (GrammarSpec.json_schema({"allOf": [{"type": "integer"}, {"minimum": 3}]}), "'allOf' with more than one"),
    (GrammarSpec.json_schema({"type": "number", "multipleOf": 0.5}), "'multipleOf' is supported only"),
    (GrammarSpec.json_schema({"type": "string", "format": "idn-email"}), "the format 'idn-email'"),
    (GrammarSpec.json_schema({"type": "string", "pattern": "^a+$", "maxLength": 3}), "together with 'pattern'"),
    (GrammarSpec.json_schema({"type": ["string", "null"], "maxLength": 3}), "only with \"type\": \"string\""),
    (GrammarSpec.json_schema({"type": "strin"}), "json_schema: .*strin"),
    (GrammarSpec.json_schema({"$ref": "#/$defs/missing"}), "json_schema: .*missing"),
    (GrammarSpec("json_schema", "{not json"), "json_schema: not valid JSON"),
    (GrammarSpec("regex", "(ab"), "regex: .*parenthesis"),
    (GrammarSpec("regex", "a(?=b)"), "regex: .*[Ll]ookahead"),
    (GrammarSpec.choice([]), "choice: the list of choices is empty"),
    (GrammarSpec("choice", '"yes"'), "choice: not a JSON list of strings"),
])
def test_unsupported_grammars_are_refused_clearly(compiler, spec, message):
    with pytest.raises(UnsupportedGrammar, match=message):
        compiler.compile(spec)


def test_bad_specs_are_refused():
    with pytest.raises(UnsupportedGrammar, match="grammar kind 'yaml'"):
        GrammarSpec("yaml", "x")  # type: ignore[arg-type]
    with pytest.raises(UnsupportedGrammar, match="regex: needs a value"):
        GrammarSpec("regex")
    with pytest.raises(UnsupportedGrammar, match="json_object: takes no value"):
        GrammarSpec("json_object", "{}")
