"""Grammar-constrained decoding: which library, and what it costs a batched decode step.

Part 1 (library choice) drives B = 1, 8, 32 matchers of the same JSON-schema grammar through
seeded random walks over a 32,000-piece LLaMA-style SentencePiece vocabulary and times, per
decode step, what a constrained step adds: filling the token bitmask for the batch, applying it
to the ``[B, 32000]`` logits, and advancing every matcher by its chosen token. Sampling (argmax
of the masked random logits) is not counted. The variants run interleaved, round after round,
on the same seeds, so load from other processes hits them alike; medians are reported, as
microseconds per step and per token (per step / B), plus each library's compile time per schema
(with the vocabulary preprocessing, which is paid once per tokenizer, reported apart).

    xgrammar      TokenizerInfo (BYTE_FALLBACK) -> compile_json_schema -> GrammarMatcher,
                  BatchGrammarMatcher.batch_fill_next_token_bitmask, apply_token_bitmask_inplace (CPU kernel)
    outlines-core Vocabulary (bytes) -> build_regex_from_schema -> Index -> Guide,
                  Guide.write_mask_into per row, outlines_core.kernels.torch.apply_token_bitmask_inplace
                  (torch.compile'd: inductor's vectorised C++ on a CPU)
    xgrammar+compiled_apply  xgrammar's fill and accept, outlines-core's apply kernel (the bitmask
                  layout is the same): the libraries compared on their own parts
    model.structured  the module as the decoder calls it: mask_logits (fill + apply + its guards,
                  all counted under "apply") and GrammarMatcher.accept

On a CPU the apply kernel dominates and is not the library's own business (on a GPU xgrammar
applies the mask with a Triton kernel); ``ratio_outlines_core_vs_xgrammar_fill_accept`` compares
what each library itself adds.

Part 2 (end to end) decodes B sequences on the project's batched decoder (``model.batching``
through ``LlamaVid.paged_decoder``) with and without ``GenerationParams.grammar`` and reports
ms per token and the ratio; it reports "integration pending" while the decoder has no grammar
support yet.

No tokenizer with LLaMA's 32,000 real pieces ships with the project (the tiny and demo
checkpoints have 400-1,000), so one is trained here with the project's own LLaMA-convention
trainer (``model.tools.tiny.train_sentencepiece``: BPE, byte fallback, unk/bos/eos = 0/1/2) on
the Python sources of the installed ``transformers`` package, and cached under ``--cache``.

    python bench/structured.py -> bench/results/structured.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import torch

from model.tokenizer import LlamaTextTokenizer
from model.tools.tiny import train_sentencepiece

VOCAB = 32000

# A typical answer schema: enums, integers, a number, bounded strings, a nested object, an array of objects.
SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 40},
        "category": {"enum": ["cooking", "sports", "music", "other"]},
        "confidence": {"type": "number"},
        "scene": {
            "type": "object",
            "properties": {"place": {"type": "string", "maxLength": 20}, "people": {"type": "integer"}},
            "required": ["place", "people"],
            "additionalProperties": False,
        },
        "objects": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 16},
                               "color": {"enum": ["red", "green", "blue", "other"]},
                               "count": {"type": "integer"}},
                "required": ["name", "color", "count"],
                "additionalProperties": False,
            },
            "maxItems": 4,
        },
    },
    "required": ["answer", "category", "confidence", "scene", "objects"],
    "additionalProperties": False,
}
SMALL_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "frames": {"type": "integer"}},
    "required": ["answer", "frames"],
    "additionalProperties": False,
}


def llama_like_tokenizer(cache: Path) -> LlamaTextTokenizer:
    """A 32,000-piece SentencePiece BPE with LLaMA's conventions, trained once and cached."""
    path = cache / "llama-like-32000.model"
    if not path.is_file():
        import transformers

        lines: list[str] = []
        for source in sorted(Path(transformers.__file__).parent.rglob("*.py")):
            lines += [line for line in source.read_text(errors="ignore").splitlines() if line.strip()]
        cache.mkdir(parents=True, exist_ok=True)
        train_sentencepiece(lines[:600_000], VOCAB, path)
    tokenizer = LlamaTextTokenizer(path)
    if tokenizer.vocab_size != VOCAB:
        raise SystemExit(f"{path}: {tokenizer.vocab_size} pieces, expected {VOCAB}")
    return tokenizer


def piece_bytes(tokenizer: LlamaTextTokenizer) -> dict[bytes, list[int]]:
    """Each normal piece's bytes (``▁`` is a space, ``<0xNN>`` one byte); control and unknown ids left out."""
    sp, out = tokenizer.sp, {}
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i):
            continue
        piece = sp.id_to_piece(i)
        byte = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
        out.setdefault(bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode(), []).append(i)
    return out


# -- the two libraries, raw ----------------------------------------------------------------------------
class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer: LlamaTextTokenizer) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        sp = tokenizer.sp
        started = time.perf_counter()
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        info = xgr.TokenizerInfo(pieces, xgr.VocabType.BYTE_FALLBACK, vocab_size=VOCAB,
                                 stop_token_ids=[tokenizer.eos_id], add_prefix_space=True)
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.compiler.compile_builtin_json_grammar()  # the first compile builds the tokenizer's tables
        self.setup_seconds = time.perf_counter() - started
        self.batch = xgr.BatchGrammarMatcher()

    def compile(self, schema: dict) -> object:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matchers(self, grammar: object, count: int) -> list:
        return [self.xgr.GrammarMatcher(grammar) for _ in range(count)]

    def bitmask(self, rows: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(rows, VOCAB)

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
        else:
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)

    def accept(self, matchers: list, tokens: list[int]) -> None:
        for matcher, token in zip(matchers, tokens):
            if not matcher.accept_token(token):
                raise AssertionError(f"xgrammar rejected its own allowed token {token}")

    @staticmethod
    def done(matcher: object) -> bool:
        return matcher.is_terminated()


class OutlinesCore:
    name = "outlines_core"

    def __init__(self, tokenizer: LlamaTextTokenizer) -> None:
        import outlines_core as oc
        from outlines_core.kernels.torch import apply_token_bitmask_inplace

        self.oc, self.kernel = oc, apply_token_bitmask_inplace
        self.eos = tokenizer.eos_id
        started = time.perf_counter()
        self.vocabulary = oc.Vocabulary(tokenizer.eos_id, piece_bytes(tokenizer))
        self.setup_seconds = time.perf_counter() - started
        # its apply kernel is torch.compile'd: compile it here, outside every timing
        for rows in (1, 4):
            self.kernel(torch.zeros(rows, VOCAB), torch.full((rows, (VOCAB + 31) // 32), -1, dtype=torch.int32))

    def compile(self, schema: dict) -> object:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), "")  # no free whitespace
        return self.oc.Index(regex, self.vocabulary)

    def matchers(self, grammar: object, count: int) -> list:
        return [[self.oc.Guide(grammar), False] for _ in range(count)]  # [guide, EOS taken]

    def bitmask(self, rows: int) -> torch.Tensor:
        return torch.zeros(rows, (VOCAB + 31) // 32, dtype=torch.int32)

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        row = bitmask.shape[1]
        for i, (guide, _) in enumerate(matchers):
            guide.write_mask_into(bitmask[i].data_ptr(), row, 4)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.kernel(logits, bitmask)

    def accept(self, matchers: list, tokens: list[int]) -> None:
        for entry, token in zip(matchers, tokens):
            if token == self.eos:  # a final state has no EOS transition: the walk ends here
                entry[1] = True
            else:
                entry[0].advance(token, return_tokens=False)

    @staticmethod
    def done(entry: list) -> bool:
        return entry[1]


class XgrammarCompiledApply(Xgrammar):
    """xgrammar's fill and accept with outlines-core's torch.compile'd apply kernel: the bitmask
    layout is the same, so this isolates what the libraries themselves cost."""

    name = "xgrammar+compiled_apply"

    def __init__(self, tokenizer: LlamaTextTokenizer) -> None:
        super().__init__(tokenizer)
        from outlines_core.kernels.torch import apply_token_bitmask_inplace

        self.kernel = apply_token_bitmask_inplace

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.kernel(logits, bitmask)


class Module:
    """``model.structured`` as the decoder calls it: ``mask_logits`` (fill + apply) and ``accept``."""

    name = "model.structured"

    def __init__(self, tokenizer: LlamaTextTokenizer) -> None:
        from model import structured

        self.structured = structured
        started = time.perf_counter()
        self.compiler = structured.GrammarCompiler(tokenizer, VOCAB, tokenizer.eos_id)
        self.compiler.compile(structured.GrammarSpec("json_object"))
        self.setup_seconds = time.perf_counter() - started
        self.eos = tokenizer.eos_id

    def compile(self, schema: dict) -> object:
        self.compiler._cache.clear()  # time the compile, not the cache
        return self.compiler.compile(self.structured.GrammarSpec.json_schema(schema))

    def matchers(self, grammar, count: int) -> list:
        return [grammar.matcher() for _ in range(count)]

    def bitmask(self, rows: int) -> None:
        return None

    def fill(self, matchers: list, bitmask: None) -> None:
        pass  # mask_logits fills and applies in one call: all of it is counted under "apply"

    def apply(self, logits: torch.Tensor, bitmask: None) -> None:
        self.structured.mask_logits(logits, self._live)

    def accept(self, matchers: list, tokens: list[int]) -> None:
        for matcher, token in zip(matchers, tokens):
            matcher.accept(token)

    @staticmethod
    def done(matcher) -> bool:
        return matcher.terminated


def walk_step_costs(lib, grammar: object, batch: int, steps: int, seed: int) -> tuple[float, float, float]:
    """Seconds spent in (fill, apply, accept) over ``steps`` batched steps; finished walks restart."""
    generator = torch.Generator().manual_seed(seed)
    matchers = lib.matchers(grammar, batch)
    bitmask = lib.bitmask(batch)
    fill_s = apply_s = accept_s = 0.0
    for _ in range(steps):
        logits = torch.randn(batch, VOCAB, generator=generator)
        t0 = time.perf_counter()
        lib._live = matchers
        lib.fill(matchers, bitmask)
        t1 = time.perf_counter()
        lib.apply(logits, bitmask)
        t2 = time.perf_counter()
        tokens = logits.argmax(dim=-1).tolist()
        t3 = time.perf_counter()
        lib.accept(matchers, tokens)
        t4 = time.perf_counter()
        fill_s, apply_s, accept_s = fill_s + t1 - t0, apply_s + t2 - t1, accept_s + t4 - t3
        for i, matcher in enumerate(matchers):
            if lib.done(matcher):
                matchers[i] = lib.matchers(grammar, 1)[0]
    return fill_s, apply_s, accept_s


def library_choice(tokenizer: LlamaTextTokenizer, *, steps: int, rounds: int, batches: list[int]) -> dict:
    libs = [Xgrammar(tokenizer)]
    try:  # not a dependency of the project: only this comparison needs it
        libs += [OutlinesCore(tokenizer), XgrammarCompiledApply(tokenizer)]
    except ImportError:
        print("outlines_core is not installed (pip install outlines_core==0.2.14): comparing without it")
    libs.append(Module(tokenizer))
    compile_s: dict[str, dict[str, list[float]]] = {lib.name: {} for lib in libs}
    schemas = {"answer_schema": SCHEMA, "small_schema": SMALL_SCHEMA}
    for _ in range(3):
        for lib in libs:
            for label, schema in schemas.items():
                started = time.perf_counter()
                lib.compile(schema)
                compile_s[lib.name].setdefault(label, []).append(time.perf_counter() - started)
    grammars = {lib.name: lib.compile(SCHEMA) for lib in libs}
    per_step: dict[str, dict[int, list[tuple[float, ...]]]] = {lib.name: {b: [] for b in batches} for lib in libs}
    for lib in libs:  # warm-up: first touches, thread pools
        walk_step_costs(lib, grammars[lib.name], max(batches), 20, seed=999)
    for r in range(rounds):
        for batch in batches:
            for lib in libs if r % 2 == 0 else libs[::-1]:
                costs = walk_step_costs(lib, grammars[lib.name], batch, steps, seed=r)
                per_step[lib.name][batch].append(tuple(c / steps for c in costs))
    out: dict = {}
    for lib in libs:
        rows = {}
        for batch in batches:
            samples = per_step[lib.name][batch]
            total = statistics.median(sum(s) for s in samples)
            rows[f"B={batch}"] = {
                "us_per_token": round(total * 1e6 / batch, 1),
                "us_per_step": round(total * 1e6, 1),
                **{f"us_{part}_per_step": round(statistics.median(s[i] for s in samples) * 1e6, 1)
                   for i, part in enumerate(("fill", "apply", "accept"))},
            }
        out[lib.name] = {
            "vocabulary_setup_s": round(lib.setup_seconds, 3),
            "compile_ms_median": {k: round(statistics.median(v) * 1e3, 2) for k, v in compile_s[lib.name].items()},
            "overhead": rows,
        }
    if "outlines_core" not in out:
        out["outlines_core"] = "not installed"
        return out
    for batch in batches:
        x = out["xgrammar"]["overhead"][f"B={batch}"]["us_per_step"]
        o = out["outlines_core"]["overhead"][f"B={batch}"]["us_per_step"]
        out.setdefault("ratio_outlines_core_vs_xgrammar", {})[f"B={batch}"] = round(o / x, 2)
        # the libraries' own parts (the apply kernel is interchangeable: the bitmask layout is the same)
        own = {name: out[name]["overhead"][f"B={batch}"] for name in ("xgrammar", "outlines_core")}
        x, o = ((r["us_fill_per_step"] + r["us_accept_per_step"]) for r in own.values())
        out.setdefault("ratio_outlines_core_vs_xgrammar_fill_accept", {})[f"B={batch}"] = round(o / x, 2)
    return out


# -- part 2: end to end on the batched decoder -------------------------------------------------------
def build_model(tokenizer_path: Path, hidden: int, layers: int):
    """A random LLaMA-VID with this 32,000-piece vocabulary, built in memory by the project's own
    builder (``model.tools.tiny``); only its LLM runs here."""
    from model.tools.tiny import TinySpec, build_random_llamavid, training_corpus, write_wordpiece_vocab

    spec = TinySpec(hidden=hidden, layers=layers, heads=max(1, hidden // 64), intermediate=hidden * 11 // 4,
                    vocab=VOCAB)
    with tempfile.TemporaryDirectory() as tmp:
        qformer_vocab = write_wordpiece_vocab(training_corpus(0, 200), Path(tmp) / "vocab.txt")
        return build_random_llamavid(spec, tokenizer_path, qformer_vocab, seed=0)


def decode_rate(model, prompts: list[torch.Tensor], params, steps: int) -> tuple[float, int]:
    """Seconds per generated token over ``steps`` batched decode steps (prefill not counted)."""
    decoder = model.paged_decoder(num_blocks=len(prompts) * ((prompts[0].shape[1] + steps) // 16 + 4))
    running = []
    for i, prompt in enumerate(prompts):
        seq = decoder.sequence(i, prompt, params)
        decoder.start(seq)
        while decoder.prefill(seq) is None:
            pass
        running.append(seq)
    tokens = 0
    started = time.perf_counter()
    for _ in range(steps - 1):
        running = [s for s in running if s.blocks]
        if not running:
            break
        tokens += len(decoder.step(running))
    elapsed = time.perf_counter() - started
    for seq in running:
        if seq.blocks:
            decoder.free(seq)
    return elapsed / max(tokens, 1), tokens


def end_to_end(args: argparse.Namespace, tokenizer_path: Path) -> dict:
    from dataclasses import fields, replace

    from model.generate import GenerationParams

    if "grammar" not in {f.name for f in fields(GenerationParams)}:
        return {"status": "integration pending: GenerationParams has no 'grammar' field yet"}
    from model.structured import GrammarSpec

    model = build_model(tokenizer_path, args.hidden, args.layers)
    llm = model.llm
    model.grammar_compiler()  # the vocabulary tables: built once per model, not per request
    generator = torch.Generator().manual_seed(0)
    free = GenerationParams(max_new_tokens=args.new_tokens, temperature=0.0)
    constrained = replace(free, grammar=GrammarSpec.json_schema(SCHEMA))
    samples: dict[int, dict[str, list[float]]] = {b: {"free": [], "grammar": []} for b in args.e2e_batches}
    counts: dict[int, dict[str, int]] = {b: {} for b in args.e2e_batches}
    with torch.inference_mode():
        prompts = {b: [llm.get_input_embeddings()(torch.randint(3, VOCAB, (1, args.prompt), generator=generator))
                       for _ in range(b)] for b in args.e2e_batches}
    for batch in args.e2e_batches:  # warm-up
        decode_rate(model, prompts[batch], free, 3)
        decode_rate(model, prompts[batch], constrained, 3)
    for r in range(args.e2e_rounds):
        for batch in args.e2e_batches:
            order = (("free", free), ("grammar", constrained))
            for name, params in order if r % 2 == 0 else order[::-1]:
                seconds, tokens = decode_rate(model, prompts[batch], params, args.new_tokens)
                samples[batch][name].append(seconds)
                counts[batch][name] = tokens
    rows = {}
    for batch in args.e2e_batches:
        ratios = [g / f for f, g in zip(samples[batch]["free"], samples[batch]["grammar"])]  # per round: same load
        rows[f"B={batch}"] = {
            "free_ms_per_token": round(statistics.median(samples[batch]["free"]) * 1e3, 3),
            "grammar_ms_per_token": round(statistics.median(samples[batch]["grammar"]) * 1e3, 3),
            "ratio_grammar_vs_free": round(statistics.median(ratios), 2),
            "tokens_per_run": counts[batch],
        }
    return {
        "model": f"random LLaMA-VID LLM, {args.layers} layers x {args.hidden} hidden, vocab {VOCAB}, fp32, "
                 f"greedy, prompt {args.prompt} positions, {args.new_tokens} new tokens",
        "grammar": "json_schema (the part-1 answer schema)",
        "decoder": "LlamaVid.paged_decoder -> PagedDecoder.sequence/start/prefill/step",
        "rounds": args.e2e_rounds,
        "results": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="decode steps per walk (part 1)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved repetitions (medians reported)")
    # one intra-op thread: on a shared two-core box a second one mostly waits at barriers
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "llamavid-bench")
    parser.add_argument("--part", choices=["1", "2", "all"], default="all")
    parser.add_argument("--hidden", type=int, default=512, help="part 2: the LLM's width")
    parser.add_argument("--layers", type=int, default=4, help="part 2: the LLM's depth")
    parser.add_argument("--prompt", type=int, default=64, help="part 2: prompt positions")
    parser.add_argument("--new-tokens", type=int, default=32, help="part 2: decode steps timed")
    parser.add_argument("--e2e-rounds", type=int, default=5)
    parser.add_argument("--e2e-batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "structured.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = llama_like_tokenizer(args.cache)
    result: dict = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "vocabulary": f"{VOCAB}-piece SentencePiece BPE, LLaMA conventions, trained on transformers' sources",
    }
    if args.part in ("1", "all"):
        result["library_choice"] = library_choice(tokenizer, steps=args.steps, rounds=args.rounds, batches=[1, 8, 32])
    if args.part in ("2", "all"):
        result["end_to_end"] = end_to_end(args, args.cache / "llama-like-32000.model")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
