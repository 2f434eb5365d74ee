"""Real-size GPU benchmark: a 7B-shaped LLaMA-VID built with random weights on the device.

Nothing is downloaded (the device has no network): the 7B preset of ``model.tools.tiny`` (Vicuna-7B
LLM, EVA-G at 224 px, bert-base Q-Former) is built directly on the GPU in bf16, with the service's
own code paths. Measured, each against a baseline or ceiling from the same run:

* the device's bf16 matrix rate (8192^3 GEMMs), the ceiling for the compute-bound parts;
* EVA-G frames/s, and the share of the matrix ceiling it reaches (FLOPs counted from the config:
  ~0.5 TFLOP per 224 px frame);
* ``frame_tokens`` frames/s for a 300-frame video (the question-conditioned two tokens per frame);
* prefill tokens/s and time to first token with cached features (300 frames, ~640 positions);
* decode tokens/s of the paged batched decoder at 1 / 8 / 32 concurrent questions, against the
  one-request-at-a-time loop (``generate_tokens``) in the same run;
* the memory plan for this device (``model.memory``): its KV cache is the pool the decoder uses, and
  peak memory is compared with what the plan reserved.

    python bench/gpu.py                      # on the device: -> $OUT/gpu.json (or bench/results/gpu.json)
    python bench/gpu.py --preset small ...   # the same code on a CPU, small enough to check the script
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

from model.conversation import Message  # noqa: E402
from model.generate import GenerationParams, generate_tokens  # noqa: E402
from model.llama_vid import LlamaVid, VisualInput  # noqa: E402
from model.memory import plan_memory  # noqa: E402
from model.tools.tiny import (  # noqa: E402,E501
    PRESETS,
    build_random_llamavid,
    train_sentencepiece,
    training_corpus,
    write_wordpiece_vocab,
)

QUESTION = "What is the man doing in the kitchen, and what happens after he opens the fridge?"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int) -> dict:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = timed(lambda: a @ b, device, repeats=10, warmup=3)
    return {"n": n, "tflops": round(2 * n**3 / seconds / 1e12, 1)}


def eva_flops_per_frame(model: LlamaVid) -> float:
    """Matmul FLOPs of one frame through the tower (patch embedding, qkv, attention, projection, MLP)."""
    cfg = model.vision.config
    d, m, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    n = 1 + model.vision.num_patches
    per_layer = 2 * n * (4 * d * d + 2 * d * m) + 2 * 2 * n * n * d
    return 2 * model.vision.num_patches * 3 * cfg.patch_size**2 * d + layers * per_layer


def build(preset: str, device: torch.device, dtype: torch.dtype) -> LlamaVid:
    spec = PRESETS[preset]
    lines = training_corpus(0)
    with tempfile.TemporaryDirectory() as tmp:
        sp = train_sentencepiece(lines, min(spec.vocab, 1000), Path(tmp) / "tokenizer.model")
        qdir = Path(tmp) / "qformer_tokenizer"
        qdir.mkdir()
        vocab = write_wordpiece_vocab(lines, qdir / "vocab.txt",
                                      size=30522 if spec.qformer.vocab_size == 30523 else None)
        with torch.device(device):
            model = build_random_llamavid(spec, sp, vocab, seed=0, dtype=dtype)
    return model.to(device).requires_grad_(False)


def prompts(model: LlamaVid, frames: int, count: int) -> list:
    """``count`` prepared prompts about a ``frames``-frame video (different questions, so different
    tokens)."""
    features = torch.randn(frames, 1 + model.vision.num_patches, model.config.mm_hidden_size,
                           dtype=torch.float16)
    out = []
    for i in range(count):
        out.append(model.prepare([Message("user", f"{QUESTION} ({i})")], VisualInput(features, "video")))
    return out


def decode_batched(decoder, prepared: list, new_tokens: int) -> dict:
    """Tokens/s of the paged decoder with every request admitted and prefilled, then stepped together."""
    params = GenerationParams(max_new_tokens=new_tokens + 1, temperature=0.0)
    seqs = []
    for i, p in enumerate(prepared):
        seq = decoder.sequence(i, p.inputs_embeds, params)
        decoder.start(seq)
        while decoder.prefill(seq) is None:
            pass
        seqs.append(seq)
    device = decoder.pool.keys[0].device
    sync(device)
    start = time.perf_counter()
    steps = 0
    while seqs:
        decoder.step(seqs)
        seqs = [s for s in seqs if s.blocks]
        steps += 1
    sync(device)
    seconds = time.perf_counter() - start
    return {"concurrency": len(prepared), "steps": steps, "step_ms": round(1000 * seconds / max(steps, 1), 2),
            "tokens_per_s": round(len(prepared) * steps / seconds, 1)}


def decode_alone(model: LlamaVid, prepared: list, new_tokens: int) -> dict:
    """The baseline: the same requests decoded one after another by the single-request loop."""
    params = GenerationParams(max_new_tokens=new_tokens, temperature=0.0)
    device = model.device
    sync(device)
    start = time.perf_counter()
    tokens = 0
    for p in prepared:
        tokens += sum(1 for _ in generate_tokens(model.llm, p.inputs_embeds, params, eos_id=-1))
    sync(device)
    seconds = time.perf_counter() - start
    return {"requests": len(prepared), "tokens_per_s": round(tokens / seconds, 1)}


def profile_decode(model: LlamaVid, prepared: list, plan, device: torch.device) -> None:
    """Where a decode step's time goes: the paged step for 1 and 8 questions, and the plain loop's step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    decoder = model.paged_decoder(min(plan.num_blocks, 4096), block_size=plan.block_size)
    params = GenerationParams(max_new_tokens=200, temperature=0.0)
    for n in (1, 8):
        seqs = []
        for i, p in enumerate(prepared[:n]):
            seq = decoder.sequence(i, p.inputs_embeds, params)
            decoder.start(seq)
            while decoder.prefill(seq) is None:
                pass
            seqs.append(seq)
        for _ in range(3):
            decoder.step(seqs)
        sync(device)
        with profile(activities=activities) as prof:
            for _ in range(5):
                decoder.step(seqs)
            sync(device)
        print(f"== paged step, {n} questions")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
        for seq in seqs:
            decoder.free(seq)
    tokens = generate_tokens(model.llm, prepared[0].inputs_embeds, params, eos_id=-1)
    for _ in range(4):
        next(tokens)
    with profile(activities=activities) as prof:
        for _ in range(5):
            next(tokens)
        sync(device)
    print("== generate_tokens step")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="7b", choices=sorted(PRESETS))
    parser.add_argument("--frames", type=int, default=300, help="frames per video (2 visual tokens each)")
    parser.add_argument("--eva-batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true",
                        help="only profile decode steps (batched vs alone) and stop")
    args = parser.parse_args()
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / (("gpu" if args.preset == "7b" else f"gpu-{args.preset}")
                     + ("-profile" if args.profile else "") + ".json")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result: dict = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "transformers": transformers.__version__, "dtype": str(dtype),
        "args": vars(args),
    }

    def save() -> None:
        out.write_text(json.dumps(result, indent=2) + "\n")

    def phase(name: str, fn: Callable[[], dict]) -> None:
        """Run one measurement; a failure is recorded and the next phase still runs."""
        started = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as exc:  # noqa: BLE001 - a benchmark reports every failure and goes on
            result[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        result[name]["seconds"] = round(time.perf_counter() - started, 1)
        result[name]["peak_gib"] = peak_gib(device)
        print(f"{name}: {json.dumps({k: v for k, v in result[name].items() if k != 'trace'})}", flush=True)
        save()

    phase("matmul_ceiling", lambda: matmul_ceiling(device, dtype, 8192 if device.type == "cuda" else 1024))
    model: LlamaVid | None = None

    def build_phase() -> dict:
        nonlocal model
        model = build(args.preset, device, dtype)
        sizes = {name: sum(p.numel() * p.element_size() for p in part.parameters()) / 2**30
                 for name, part in (("llm", model.llm), ("eva", model.vision), ("qformer", model.qformer),
                                    ("head", model.visual))}
        return {"weights_gib": {k: round(v, 2) for k, v in sizes.items()}}

    phase("build", build_phase)
    if model is None:
        return 1

    def eva() -> dict:
        size = model.processor.crop_size
        pixels = torch.randn(args.eva_batch, 3, size, size, device=device)
        seconds = timed(lambda: model.encode_frames(pixels, batch_size=args.eva_batch), device, args.repeats)
        fps = args.eva_batch / seconds
        tflops = fps * eva_flops_per_frame(model) / 1e12
        ceiling = result.get("matmul_ceiling", {}).get("tflops")
        return {"batch": args.eva_batch, "frames_per_s": round(fps, 1),
                "tflop_per_frame": round(eva_flops_per_frame(model) / 1e12, 3),
                "achieved_tflops": round(tflops, 1),
                "share_of_matmul_ceiling": round(tflops / ceiling, 3) if ceiling else None}

    if not args.profile:
        phase("eva", eva)

    def frame_tokens() -> dict:
        features = torch.randn(args.frames, 1 + model.vision.num_patches, model.config.mm_hidden_size,
                               dtype=torch.float16)
        seconds = timed(lambda: model.frame_tokens(features, QUESTION), device, args.repeats)
        return {"frames": args.frames, "frames_per_s": round(args.frames / seconds, 1)}

    if not args.profile:
        phase("frame_tokens", frame_tokens)

    def prefill() -> dict:
        [prepared] = prompts(model, args.frames, 1)
        params = GenerationParams(max_new_tokens=1, temperature=0.0)
        first = lambda: next(generate_tokens(model.llm, prepared.inputs_embeds, params, eos_id=-1))  # noqa: E731
        seconds = timed(first, device, args.repeats)
        features = torch.randn(args.frames, 1 + model.vision.num_patches, model.config.mm_hidden_size,
                               dtype=torch.float16)

        def ttft() -> None:  # cached features -> two tokens per frame -> splice -> prefill -> first token
            p = model.prepare([Message("user", QUESTION)], VisualInput(features, "video"))
            next(generate_tokens(model.llm, p.inputs_embeds, params, eos_id=-1))

        return {"positions": prepared.num_prompt_tokens, "visual_tokens": prepared.num_visual_tokens,
                "prefill_tokens_per_s": round(prepared.num_prompt_tokens / seconds, 1),
                "ttft_cached_features_ms": round(1000 * timed(ttft, device, args.repeats), 1)}

    if not args.profile:
        phase("prefill", prefill)

    def plan_phase() -> dict:
        device_bytes = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                        else 8 << 30)
        v = model.vision.config
        plan = plan_memory(model.config, device_bytes=device_bytes, dtype=dtype,
                           max_new_tokens=args.new_tokens + 1,
                           kv_cache_bytes=None if device.type == "cuda" else 1 << 30,
                           eva_dims=(v.hidden_size, v.num_hidden_layers, v.intermediate_size, v.patch_size))
        planned.append(plan)
        return {"weights_gib": round(plan.weights_bytes / 2**30, 2),
                "activation_gib": round(plan.activation_bytes / 2**30, 2),
                "kv_cache_gib": round(plan.kv_cache_bytes / 2**30, 2),
                "kv_bytes_per_token": plan.kv_bytes_per_token,
                "max_concurrent_tokens": plan.max_concurrent_tokens,
                "questions_of_300_frames": plan.questions_at_once(300),
                "planned_total_gib": round((plan.weights_bytes + plan.activation_bytes + plan.kv_cache_bytes)
                                           / 2**30, 2)}

    planned: list = []
    phase("plan", plan_phase)
    plan = planned[0] if planned else None
    levels = [int(c) for c in args.concurrency.split(",")]
    many = prompts(model, args.frames, max(levels))
    if args.profile:
        profile_decode(model, many[:8], plan, device)
        return 0

    def decode() -> dict:
        decoder = model.paged_decoder(plan.num_blocks, block_size=plan.block_size)  # the pool the plan sized
        rows = [decode_batched(decoder, many[:n], args.new_tokens) for n in levels]
        baseline_n = min(8, max(levels))
        alone = decode_alone(model, many[:baseline_n], args.new_tokens)
        batched = next((r for r in rows if r["concurrency"] == baseline_n), rows[-1])
        return {"batched": rows, "one_at_a_time": alone,
                "speedup_at_baseline_concurrency": round(batched["tokens_per_s"] / alone["tokens_per_s"], 2)}

    phase("decode", decode)
    save()
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
