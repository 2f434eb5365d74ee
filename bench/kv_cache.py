"""The paged KV cache on a CPU at Vicuna-7B's width: memory follows live positions, and batching pays.

A two-layer LLaMA as wide as Vicuna-7B (4096 hidden, 32 heads of 128, 11008 MLP, 32K vocabulary;
random weights, fp32) decodes questions with 700-position prompts (a 300-frame video's visual
tokens and its text). Measured in one run:

* resident memory of the KV pool (its pages the process has touched, asked of the kernel) after
  1, 4 and 8 questions hold their positions: the pool is reserved up front but only the blocks in
  use are ever written, so memory grows with live positions, where the slot cache it replaces
  took slots x capacity at once (computed for the old defaults, 8 slots x 8192 positions);
* decode tokens/s with 8 questions in one batch against the same 8 decoded one at a time
  (``generate_tokens``).

    python bench/kv_cache.py -> bench/results/kv_cache.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from model.batching import PagedDecoder  # noqa: E402
from model.generate import GenerationParams, generate_tokens  # noqa: E402
from model.kv_cache import BlockPool  # noqa: E402
from model.memory import kv_bytes_per_token  # noqa: E402

MiB = 1 << 20


def resident_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of these tensors that are resident in RAM (pages touched), asked of the kernel (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    total = 0
    for tensor in tensors:
        start = tensor.data_ptr() // page * page
        length = tensor.data_ptr() + tensor.numel() * tensor.element_size() - start
        pages = (ctypes.c_ubyte * (-(-length // page)))()
        if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), pages) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        total += sum(p & 1 for p in pages) * page
    return total


def vicuna_width_llama(layers: int) -> LlamaForCausalLM:
    """A LLaMA as wide as Vicuna-7B with ``layers`` layers, random weights (seed 0), fp32."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=700)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kv_cache.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = vicuna_width_llama(args.layers)
    per_token = kv_bytes_per_token(llm.config, torch.float32)
    block_size, capacity_positions = 16, 16384
    pool = BlockPool(args.layers, capacity_positions // block_size + 1, block_size, 32, 128, torch.float32,
                     "cpu")
    decoder = PagedDecoder(llm, pool, eos_id=-1)
    with torch.inference_mode():
        prompts = [llm.get_input_embeddings()(torch.randint(3, 32000, (1, args.prompt))) for _ in range(8)]
    params = GenerationParams(max_new_tokens=args.new_tokens + 1, temperature=0.0)

    # -- memory follows live positions -----------------------------------------------------------
    memory = []
    tensors = [*pool.keys, *pool.values]
    seqs = []
    for count in (1, 4, 8):
        while len(seqs) < count:
            seq = decoder.sequence(len(seqs), prompts[len(seqs)], params)
            decoder.start(seq)
            while decoder.prefill(seq) is None:
                pass
            seqs.append(seq)
        live = sum(s.length for s in seqs)
        memory.append({"questions": count, "live_positions": live,
                       "kv_bytes_in_use": (pool.usable_blocks - pool.free_blocks) * block_size * per_token,
                       "pool_resident_bytes": resident_bytes(tensors)})
    for seq in seqs:
        decoder.free(seq)

    # -- batched decode against one at a time ------------------------------------------------------
    running = []
    for i in range(8):
        seq = decoder.sequence(i, prompts[i], params)
        decoder.start(seq)
        while decoder.prefill(seq) is None:
            pass
        running.append(seq)
    started, steps = time.perf_counter(), 0
    while running:
        decoder.step(running)
        running = [s for s in running if s.blocks]
        steps += 1
    batched = 8 * args.new_tokens / (time.perf_counter() - started)
    alone_params = GenerationParams(max_new_tokens=args.new_tokens, temperature=0.0)
    started = time.perf_counter()
    for prompt in prompts:
        for _ in generate_tokens(llm, prompt, alone_params, eos_id=-1):
            pass
    # the one-at-a-time loop's time includes each prefill: take it out to compare decode with decode
    prefill_started = time.perf_counter()
    for prompt in prompts:
        next(generate_tokens(llm, prompt, GenerationParams(max_new_tokens=1, temperature=0.0), eos_id=-1))
    prefill_seconds = time.perf_counter() - prefill_started
    alone = 8 * args.new_tokens / (prefill_started - started - prefill_seconds)

    result = {
        "model": f"LLaMA {args.layers} layers at Vicuna-7B width "
                 "(4096, 32 x 128 heads, 11008, vocab 32000), fp32",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}",
        "kv_bytes_per_position": per_token,
        "pool_reserved_bytes": capacity_positions * per_token,
        # 8 slots x 8192 positions, allocated at once
        "slot_cache_at_old_defaults_bytes": 8 * 8192 * per_token,
        "memory": memory,
        "decode_tokens_per_s": {"batched_8": round(batched, 2), "one_at_a_time_8": round(alone, 2),
                                "speedup": round(batched / alone, 2)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
