"""Structured output: grammar-constrained decoding with xgrammar.

A request's grammar (OpenAI ``response_format`` json_schema / json_object, vLLM
``structured_outputs`` choice / regex) becomes a ``GrammarSpec``; ``GrammarCompiler`` turns it
into an xgrammar grammar over this model's vocabulary, once per distinct spec (LRU); each
answer gets its own ``GrammarMatcher``; and every decode step ``mask_logits`` sets the logits of
the tokens a row's grammar forbids to -inf, for the whole batch in one bitmask fill and one apply.

Why xgrammar and not outlines-core (``bench/structured.py``: 32,000-piece vocabulary, a JSON
schema, B = 1, 8, 32 on a CPU): what the library itself adds per token (mask fill + advancing the
matcher) is 5-25 % lower; with the same apply kernel the whole overhead is on par or lower
(~120 / 63 / 44 us per token against ~140 / 61 / 47); a schema compiles in ~8 ms where
outlines-core's regex-to-DFA takes ~0.7 s (bounded strings blow the DFA up); and it is a grammar
engine, so ``json_object`` (any nesting) and recursive ``$ref`` schemas are exact rather than
cut at a depth. On a CPU xgrammar's own apply kernel is the slow part (~3x outlines-core's
torch.compile'd one; the bitmask layout is the same, so a kernel can be swapped in); on a GPU
it applies the mask with Triton.

JSON is generated without free whitespace (``any_whitespace=False``: xgrammar then emits
``json.dumps``' own separators, ``", "`` and ``": "``, and nothing else between tokens), so a
small model cannot wander in spaces and newlines. Schemas compile in xgrammar's strict mode
(no properties beyond the declared ones unless the schema opens ``additionalProperties``),
which only narrows what is valid. Keywords xgrammar would accept but not enforce are refused
up front (``UnsupportedGrammar``), never silently dropped.

The LLaMA tokenizer is SentencePiece with byte fallback and a dummy prefix: pieces are handed
to xgrammar as they are (``VocabType.BYTE_FALLBACK``, ``▁`` = space, ``<0xNN>`` = one byte).
JSON never starts with a space, so an answer's first token is never a ``▁`` piece and the
detokenized text is exactly what the grammar matched. (A regex or choice that itself starts
with a space can lose it: SentencePiece decoding drops the space of an answer's first piece.)
"""

from __future__ import annotations

import importlib.util
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import xgrammar as xgr

GrammarKind = Literal["json_schema", "json_object", "choice", "regex"]
_KINDS: tuple[str, ...] = get_args(GrammarKind)


class UnsupportedGrammar(ValueError):
    """The grammar cannot be enforced exactly: invalid, or uses a feature the engine lacks."""


@dataclass(frozen=True)
class GrammarSpec:
    """One request's constraint, hashable (the compile cache's key) and JSON-serialisable (jobs).

    ``value``: json_schema: the schema as compact JSON; regex: the pattern; choice: a JSON list
    of strings; json_object: None. The schema's keys keep their order, not sorted: the answer
    writes ``properties`` in the order they are declared, and that order is the client's to
    choose (``reasoning`` before ``answer`` is not the same request as the reverse).
    """

    kind: GrammarKind
    value: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise UnsupportedGrammar(f"grammar kind {self.kind!r} is not one of {', '.join(_KINDS)}")
        if (self.value is None) != (self.kind == "json_object"):
            raise UnsupportedGrammar(f"{self.kind}: " + ("takes no value" if self.value is not None
                                                          else "needs a value"))

    @classmethod
    def from_dict(cls, raw: dict) -> GrammarSpec:
        return cls(raw["kind"], raw.get("value"))

    def to_dict(self) -> dict[str, str | None]:
        return {"kind": self.kind, "value": self.value}

    @classmethod
    def json_schema(cls, schema: dict | bool) -> GrammarSpec:
        return cls("json_schema", json.dumps(schema, separators=(",", ":"), ensure_ascii=False))

    @classmethod
    def choice(cls, choices: Sequence[str]) -> GrammarSpec:
        return cls("choice", json.dumps(list(choices)))


# -- json-schema keywords: what xgrammar enforces (checked one by one against a violating instance) --
_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                "readOnly", "writeOnly", "contentEncoding", "contentMediaType", "contentSchema"}
_ASSERTIONS = {"type", "enum", "const", "required", "minProperties", "maxProperties", "minItems", "maxItems",
               "minLength", "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
               "exclusiveMaximum", "multipleOf", "$ref"}
_SUBSCHEMA = {"additionalProperties", "unevaluatedProperties", "propertyNames", "items", "unevaluatedItems"}
_SUBSCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions"}
_SUBSCHEMA_LISTS = {"anyOf", "oneOf", "allOf", "prefixItems"}
_FORMATS = {"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
            "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"}


def prepare_schema(schema: Any, where: str = "#") -> Any:
    """The schema as xgrammar should see it, or ``UnsupportedGrammar`` naming the first keyword
    it would not enforce exactly.

    xgrammar ignores some keywords without a word (``uniqueItems``, ``not``, ``if``,
    ``dependentRequired`` ...) and drops ``maxLength`` next to a ``pattern``.
    """
    if isinstance(schema, bool):
        return schema
    if not isinstance(schema, dict):
        raise UnsupportedGrammar(f"json_schema: {where} is not a schema (an object or a boolean)")
    out: dict[str, Any] = {}
    for key, value in schema.items():
        at = f"{where}/{key}"
        if key in _ANNOTATIONS or key in _ASSERTIONS:
            out[key] = value
        elif key in _SUBSCHEMA:
            if isinstance(value, list):
                raise UnsupportedGrammar(f"json_schema: {at}: a list of schemas is not supported (use prefixItems)")
            out[key] = prepare_schema(value, at)
        elif key in _SUBSCHEMA_MAPS:
            if not isinstance(value, dict):
                raise UnsupportedGrammar(f"json_schema: {at} must be an object of schemas")
            out[key] = {name: prepare_schema(sub, f"{at}/{name}") for name, sub in value.items()}
        elif key in _SUBSCHEMA_LISTS:
            if not isinstance(value, list) or not value:
                raise UnsupportedGrammar(f"json_schema: {at} must be a non-empty list of schemas")
            if key == "allOf" and len(value) > 1:
                raise UnsupportedGrammar(f"json_schema: {at}: 'allOf' with more than one schema is not supported")
            out[key] = [prepare_schema(sub, f"{at}/{i}") for i, sub in enumerate(value)]
        else:
            raise UnsupportedGrammar(f"json_schema: the keyword {key!r} is not supported (at {at})")
    if "format" in out and out["format"] not in _FORMATS:
        raise UnsupportedGrammar(f"json_schema: the format {out['format']!r} is not supported "
                                 f"(at {where}; supported: {', '.join(sorted(_FORMATS))})")
    if "multipleOf" in out and out.get("type") != "integer":
        raise UnsupportedGrammar(f"json_schema: the keyword 'multipleOf' is supported only with "
                                 f"\"type\": \"integer\" (at {where})")
    if "minLength" in out or "maxLength" in out:
        if out.get("type") != "string":
            raise UnsupportedGrammar(f"json_schema: 'minLength'/'maxLength' are supported only with "
                                     f"\"type\": \"string\" (at {where})")
        if "pattern" in out or "format" in out:
            raise UnsupportedGrammar(f"json_schema: 'minLength'/'maxLength' together with 'pattern' or "
                                     f"'format' are not supported (at {where})")
    return out


def _choice_grammar(value: str) -> str:
    """EBNF for exactly one of the strings (JSON string literals are valid EBNF literals)."""
    try:
        choices = json.loads(value)
    except json.JSONDecodeError as e:
        raise UnsupportedGrammar(f"choice: not a JSON list of strings: {e}") from None
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise UnsupportedGrammar("choice: not a JSON list of strings")
    if not choices:
        raise UnsupportedGrammar("choice: the list of choices is empty")
    return "root ::= " + " | ".join(json.dumps(c) for c in dict.fromkeys(choices))


# A lead byte whose next byte xgrammar's UTF-8 check lets through though it makes the character
# invalid (an overlong form, a UTF-16 surrogate, or past U+10FFFF) -> those next bytes.
_BAD_SECOND_BYTE = {0xE0: range(0x80, 0xA0), 0xED: range(0xA0, 0xC0), 0xF0: range(0x80, 0x90),
                    0xF4: range(0x90, 0xC0)}


@dataclass(frozen=True)
class _Vocab:
    """What every matcher of one compiler shares: EOS, the logits width, the two guards."""

    eos_id: int
    size: int
    after_lead: dict[int, torch.Tensor]  # byte-piece id of a lead byte above -> ids it may not precede
    control_ids: frozenset[int]  # pieces holding a control character (U+0000..U+001F)
    no_control: torch.Tensor  # a bitmask row: every id but those
    first_forbid: torch.Tensor | None = None  # ids an answer may not start with (see ``_dummy_prefix``)


def _vocab(info: xgr.TokenizerInfo, eos_id: int, size: int, after_lead: dict[int, torch.Tensor],
           first_forbid: list[int]) -> _Vocab:
    control = frozenset(i for i, text in enumerate(info.decoded_vocab) if any(b < 0x20 for b in text))
    row = xgr.allocate_token_bitmask(1, size)[0]
    for i in control:
        row[i // 32] &= ~_bit(i % 32)
    return _Vocab(eos_id, size, after_lead, control, row, torch.tensor(first_forbid) if first_forbid else None)


class GrammarMatcher:
    """One answer's position in its grammar. Not thread-safe: one decode loop drives it.

    Besides the grammar it closes two gaps in xgrammar's checks, found by random walks: the
    answer stays valid UTF-8 (a byte-fallback piece ``<0xE0>`` may not be followed by
    ``<0x80>``..``<0x9F>``, and so on), and JSON never gets a raw control character (xgrammar's
    ``minLength``/``maxLength`` strings allow them). ``mask_logits`` masks those ids and
    ``accept`` refuses them.
    """

    __slots__ = ("_forbid", "_json", "_m", "_vocab")

    def __init__(self, matcher: xgr.GrammarMatcher, vocab: _Vocab, json_text: bool) -> None:
        self._m, self._vocab, self._json = matcher, vocab, json_text
        self._forbid: torch.Tensor | None = vocab.first_forbid

    @property
    def eos_id(self) -> int:
        return self._vocab.eos_id

    @property
    def vocab_size(self) -> int:
        return self._vocab.size

    def accept(self, token: int) -> None:
        """Advance by the sampled token; ``ValueError`` if the grammar did not allow it."""
        token = int(token)
        if self._m.is_terminated():
            raise ValueError(f"token {token} after the grammar ended")
        if self._json and token in self._vocab.control_ids:
            raise ValueError(f"token {token} is not allowed here (a control character in JSON)")
        if self._forbid is not None and bool((self._forbid == token).any()):
            raise ValueError(f"token {token} is not allowed here (invalid UTF-8, or a space the answer's "
                             "text would keep)")
        if not self._m.accept_token(token):
            raise ValueError(f"token {token} is not allowed by the grammar here")
        self._forbid = self._vocab.after_lead.get(token)

    @property
    def terminated(self) -> bool:
        """The answer is complete: EOS was accepted (from then on only EOS is allowed)."""
        return self._m.is_terminated()

    @property
    def can_end(self) -> bool:
        """What was accepted so far is a complete answer (EOS is allowed now)."""
        return self._m.is_completed()

    def fork(self) -> GrammarMatcher:
        """An independent copy at the same position (``n`` answers after one prefill)."""
        twin = GrammarMatcher(self._m.fork(), self._vocab, self._json)
        twin._forbid = self._forbid
        return twin


class Grammar:
    """A compiled grammar, shared (read-only) by every matcher made from it."""

    def __init__(self, compiled: xgr.CompiledGrammar, spec: GrammarSpec, vocab: _Vocab) -> None:
        self.compiled, self.spec, self._vocab = compiled, spec, vocab

    def matcher(self) -> GrammarMatcher:
        json_text = self.spec.kind in ("json_schema", "json_object")
        return GrammarMatcher(xgr.GrammarMatcher(self.compiled), self._vocab, json_text)


def _utf8_guard(pieces: list[str]) -> dict[int, torch.Tensor]:
    byte_id = {int(p[3:5], 16): i for i, p in enumerate(pieces)
               if len(p) == 6 and p.startswith("<0x") and p.endswith(">")}
    return {byte_id[lead]: torch.tensor([byte_id[b] for b in bad if b in byte_id])
            for lead, bad in _BAD_SECOND_BYTE.items() if lead in byte_id}


def _pieces(tokenizer: Any) -> list[str]:
    """The SentencePiece pieces of ``LlamaTextTokenizer`` (``.sp``) or a ``SentencePieceProcessor``.

    Control and unknown pieces (``<unk>``, ``<s>``, ``</s>``) become "": xgrammar takes an empty
    piece for a special token and never allows it, where it would read ``<s>`` as five characters
    of text (and allow it inside a JSON string). EOS is allowed through ``stop_token_ids`` alone.
    """
    sp = getattr(tokenizer, "sp", tokenizer)
    return ["" if sp.is_control(i) or sp.is_unknown(i) else sp.id_to_piece(i) for i in range(sp.get_piece_size())]


_OPTIONAL_SPACE = xgr.Grammar.from_ebnf('root ::= " "?')


def _dummy_prefix(tokenizer: Any) -> bool:
    """Whether encoding prepends SentencePiece's "▁" (LLaMA's tokenizers do), so that decoding an
    answer drops the space of its first piece."""
    sp = getattr(tokenizer, "sp", tokenizer)
    if not hasattr(sp, "encode_as_pieces"):
        return False
    pieces = sp.encode_as_pieces("x")
    return bool(pieces) and pieces[0].startswith("\u2581")


class GrammarCompiler:
    """Compiles ``GrammarSpec`` s for one model's vocabulary; thread-safe, LRU-cached by spec.

    ``tokenizer``: the model's ``LlamaTextTokenizer`` (or its ``SentencePieceProcessor``, or a
    Hugging Face tokenizer). ``vocab_size`` is the LM head's width: ids past the tokenizer's end
    (padding rows of the head) are never allowed. Building the vocabulary tables is paid once
    here (~50 ms for 32,000 pieces); a schema then compiles in milliseconds.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_id: int, *, cache_size: int = 256) -> None:
        if hasattr(tokenizer, "get_vocab") and not hasattr(tokenizer, "sp"):  # a Hugging Face tokenizer
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=[eos_id])
            guard: dict[int, torch.Tensor] = {}
            pieces = []
        else:
            pieces = _pieces(tokenizer)[:vocab_size]
            info = xgr.TokenizerInfo(pieces, xgr.VocabType.BYTE_FALLBACK, vocab_size=vocab_size,
                                     stop_token_ids=[eos_id], add_prefix_space=True)
            guard = _utf8_guard(pieces)
        # SentencePiece's dummy prefix: a LLaMA answer naturally starts with a "▁" piece whose space
        # decoding drops, so every grammar may open with one space; not the byte piece <0x20>,
        # whose space decoding keeps (then the text still matches the grammar exactly)
        self._leading_space = _dummy_prefix(tokenizer)
        byte_space = [i for i, p in enumerate(pieces) if p == "<0x20>"] if self._leading_space else []
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self._vocab = _vocab(info, eos_id, vocab_size, guard, byte_space)
        self._xgr = xgr.GrammarCompiler(info, cache_enabled=False)  # ours below is bounded by count
        self._cache: OrderedDict[GrammarSpec, Grammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> Grammar:
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        grammar = Grammar(self._compile(spec), spec, self._vocab)
        with self._lock:
            self._cache[spec] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        try:
            if spec.kind == "json_object":
                grammar = xgr.Grammar.from_json_schema('{"type":"object"}', any_whitespace=False)
            elif spec.kind == "json_schema":
                try:
                    schema = json.loads(spec.value or "")
                except json.JSONDecodeError as e:
                    raise UnsupportedGrammar(f"json_schema: not valid JSON: {e}") from None
                grammar = xgr.Grammar.from_json_schema(json.dumps(prepare_schema(schema)), any_whitespace=False)
            elif spec.kind == "regex":
                grammar = xgr.Grammar.from_regex(spec.value or "")
            else:
                grammar = xgr.Grammar.from_ebnf(_choice_grammar(spec.value or ""))
            if self._leading_space:
                grammar = xgr.Grammar.concat(_OPTIONAL_SPACE, grammar)
            return self._xgr.compile_grammar(grammar)
        except UnsupportedGrammar:
            raise
        except (RuntimeError, ValueError) as e:  # xgrammar's parse errors: "[time] file.cc:line: message"
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnsupportedGrammar(f"{spec.kind}: {message.split(': ', 1)[-1]}") from None


_APPLY_BACKEND = {"cpu": "cpu", "cuda": "triton" if importlib.util.find_spec("triton") else "torch_native"}


def mask_logits(logits: torch.Tensor, matchers: Sequence[GrammarMatcher | None]) -> None:
    """logits [B, V] in place: -inf where row i's matcher disallows a token; rows whose matcher is
    None untouched. One bitmask fill (xgrammar's thread pool) and one apply for the batch.

    A terminated row allows EOS alone, so its softmax stays finite if the caller still samples it.
    """
    if logits.dim() != 2 or logits.shape[0] != len(matchers):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(matchers)} matchers")
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    width = logits.shape[1]
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], width)  # all allowed; B x ceil(V/32) int32
    live, live_rows = [], []
    for i in rows:
        matcher = matchers[i]
        assert matcher is not None
        if matcher.vocab_size != width:
            raise ValueError(f"row {i}: grammar compiled for {matcher.vocab_size} ids, logits have {width}")
        if matcher.terminated:
            bitmask[i] = 0
            bitmask[i, matcher.eos_id // 32] = _bit(matcher.eos_id % 32)
        else:
            live.append(matcher._m)
            live_rows.append(i)
    if len(live) == 1:
        live[0].fill_next_token_bitmask(bitmask, live_rows[0])
    elif live:
        _batch_matcher().batch_fill_next_token_bitmask(live, bitmask, live_rows)
    json_rows = [i for i in live_rows if matchers[i]._json]  # type: ignore[union-attr]
    if json_rows:  # xgrammar's bounded-length strings let raw control characters in: never valid JSON
        bitmask[json_rows] &= matchers[json_rows[0]]._vocab.no_control  # type: ignore[union-attr]
    if logits.device.type != "cpu":
        bitmask = bitmask.to(logits.device, non_blocking=True)
    backend = _APPLY_BACKEND.get(logits.device.type, "torch_native")
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=width, indices=rows, backend=backend)
    for i in live_rows:  # rare: only right after a byte piece that leads a 3- or 4-byte character
        forbid = matchers[i]._forbid  # type: ignore[union-attr]
        if forbid is not None:
            logits[i, forbid.to(logits.device)] = float("-inf")


def _bit(position: int) -> int:
    """Bit ``position`` of an int32 word, as the signed value torch stores."""
    return (1 << position) - (1 << 32) if position == 31 else 1 << position


_THREAD = threading.local()


def _batch_matcher() -> xgr.BatchGrammarMatcher:
    """xgrammar's pool of fill threads (sized to the machine), one per calling thread: decoders
    in two threads never share one."""
    batch = getattr(_THREAD, "batch", None)
    if batch is None:
        batch = _THREAD.batch = xgr.BatchGrammarMatcher()
    return batch
