"""n answers from one prefill, and what log-probabilities and penalties add to a decode step.

A two-layer LLaMA as wide as Vicuna-7B (4096 hidden, 32 heads of 128, 11008 MLP, 32K vocabulary;
random weights, fp32, CPU) and a 1,200-position prompt (a 600-frame video's visual tokens). In one
run, medians of interleaved repetitions (the machine is noisy):

* ``n=4`` in one request against the same question sent as 4 requests: the LLM forwards the
  prompt once instead of 4 times (time to every answer's first token), and the answers share the
  prompt's full KV blocks (peak blocks held);
* a batched decode step of 8 answers, plain against ``top_logprobs=5`` and against all three
  penalties, per token.

    python bench/sampling.py -> bench/results/sampling.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.kv_cache import vicuna_width_llama  # noqa: E402
from model.batching import PagedDecoder  # noqa: E402
from model.generate import GenerationParams  # noqa: E402
from model.kv_cache import BlockPool  # noqa: E402


def first_tokens(decoder: PagedDecoder, prompt: torch.Tensor, n: int, requests: int) -> tuple[float, int]:
    """Seconds until every answer has its first token, and the blocks held then."""
    params = GenerationParams(max_new_tokens=8, temperature=0.8, seed=0, n=n)
    start = time.perf_counter()
    seqs = []
    for i in range(requests):
        seq = decoder.sequence(i, prompt, params)
        decoder.start(seq)
        while (first := decoder.prefill(seq)) is None:
            pass
        seqs += [s.seq for s in first]
    seconds = time.perf_counter() - start
    held = decoder.pool.usable_blocks - decoder.pool.free_blocks
    for seq in seqs:
        decoder.free(seq)
    return seconds, held


def step_ms(decoder: PagedDecoder, prompt: torch.Tensor, params: GenerationParams, steps: int) -> float:
    seqs = []
    for i in range(8):
        seq = decoder.sequence(i, prompt, params, prompt_ids=list(range(3, 203)))
        decoder.start(seq)
        while decoder.prefill(seq) is None:
            pass
        seqs.append(seq)
    decoder.step(seqs)  # warm
    start = time.perf_counter()
    for _ in range(steps):
        decoder.step(seqs)
    seconds = time.perf_counter() - start
    for seq in seqs:
        decoder.free(seq)
    return 1000 * seconds / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=1200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sampling.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = vicuna_width_llama(args.layers)
    pool = BlockPool(args.layers, 8 * (args.prompt + 64) // 16 + 2, 16, 32, 128, torch.float32, "cpu")
    decoder = PagedDecoder(llm, pool, eos_id=-1)
    with torch.inference_mode():
        prompt = llm.get_input_embeddings()(torch.randint(3, 32000, (1, args.prompt)))

    runs: dict[str, list[float]] = {"n4_one_request": [], "n1_four_requests": []}
    blocks = {}
    for _ in range(args.repeats):
        for name, n, requests in (("n4_one_request", 4, 1), ("n1_four_requests", 1, 4)):
            seconds, blocks[name] = first_tokens(decoder, prompt, n, requests)
            runs[name].append(seconds)
    shared = {name: round(statistics.median(v), 3) for name, v in runs.items()}

    variants = {
        "plain": GenerationParams(max_new_tokens=64, temperature=0.8, seed=0),
        "top_logprobs_5": GenerationParams(max_new_tokens=64, temperature=0.8, seed=0, logprobs=5),
        "penalties": GenerationParams(max_new_tokens=64, temperature=0.8, seed=0, presence_penalty=0.5,
                                      frequency_penalty=0.5, repetition_penalty=1.2),
    }
    steps: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, params in variants.items():
            steps[name].append(step_ms(decoder, prompt, params, steps=8))
    step = {name: round(statistics.median(v), 2) for name, v in steps.items()}

    result = {
        "model": f"LLaMA {args.layers} layers at Vicuna-7B width (4096, 32 x 128 heads, 11008, vocab 32000), fp32",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "prompt_positions": args.prompt,
        "first_token_of_every_answer_s": shared,
        "n4_vs_four_requests_time_ratio": round(shared["n4_one_request"] / shared["n1_four_requests"], 3),
        "kv_blocks_held": blocks,
        "n4_vs_four_requests_blocks_ratio": round(blocks["n4_one_request"] / blocks["n1_four_requests"], 3),
        "decode_step_ms_8_answers": step,
        "overhead_vs_plain": {name: round(v / step["plain"], 3) for name, v in step.items() if name != "plain"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
