"""Throughput of the model core: EVA (``LlamaVid.encode_frames``) and the two tokens per frame
(``LlamaVid.frame_tokens``), batched against a naive one-frame-at-a-time loop in the same run.

    python bench/model_core.py                       # CPU: `small` preset, 1,024 frames (naive loop: 64)
    python bench/model_core.py --device cuda         # + full-size EVA-G (1408 x 39, 224 px) in bf16

The model is a random-weight checkpoint written by ``model.tools.tiny.make_tiny`` and loaded through the
real loader, so the code measured is the code served. Inputs are random normalised pixels, so
decoding and preprocessing are not part of the numbers (see ``bench/serve.py`` for end to end).
Peak memory is the process RSS sampled every 5 ms during each phase on CPU (reported as the rise
over the RSS before the phase, plus the absolute peak), and ``torch.cuda.max_memory_allocated``
on GPU. On CUDA the full-size EVA-G row reports achieved TFLOP/s from an analytic FLOP count
(about 0.52 TFLOP per 224 px frame) and the fraction of ``--peak-tflops``.
Results go to ``bench/results/model_core.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from model.eva import EvaVisionTower, eva_config  # noqa: E402
from model.loader import load_llamavid  # noqa: E402
from model.tools.tiny import PRESETS, make_tiny  # noqa: E402

QUESTION = "What is the man doing in the kitchen, and what happens at the end of the video?"
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# -- memory ----------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:  # not Linux: the lifetime peak is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory during a ``with`` block: CUDA allocator stats, or RSS sampled by a thread."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = self.before = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            self.before = self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())

    def as_dict(self) -> dict:
        kind = "cuda_max_allocated" if self.device.type == "cuda" else "rss"
        return {"memory_kind": kind, "peak_mib": round(self.peak / 2**20, 1),
                "peak_rise_mib": round((self.peak - self.before) / 2**20, 1)}


# -- timing ----------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_memory(device: torch.device) -> None:
    """Hand freed memory back (CUDA cache, glibc arenas) so each phase's peak is its own."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def measure(name: str, device: torch.device, frames: int, fn: Callable[[], object], **extra) -> dict:
    _release_memory(device)
    with PeakMemory(device) as mem:
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    # cpu_seconds (all threads of this process) against seconds shows how much of the wall time the
    # process actually ran: on a shared machine, frames/s is only comparable within one run.
    return {"name": name, "frames": frames, "seconds": round(seconds, 4), "cpu_seconds": round(cpu_seconds, 3),
            "frames_per_s": round(frames / seconds, 2), **mem.as_dict(), **extra}


# -- the random model ------------------------------------------------------------------------------
def build_model(preset: str, device: torch.device, dtype: torch.dtype | None, workdir: Path):
    ckpt = make_tiny(workdir / f"llama-vid-{preset}", preset, fmt="safetensors", num_shards=1)
    return load_llamavid(ckpt, device=device, dtype=dtype)


def bench_core(model, device: torch.device, frames: int, naive_frames: int, batch: int) -> list[dict]:
    size = model.processor.crop_size
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(frames, 3, size, size, generator=gen).to(device, model.dtype)
    # Warm-up: allocator, oneDNN / cuBLAS plans, the tokenizer.
    features = model.encode_frames(pixels[:batch], batch_size=batch)
    model.encode_frames(pixels[:1])
    model.frame_tokens(features, QUESTION)
    model.frame_tokens(features[:1], QUESTION)

    # The naive loop runs first in each pair, so that the batched run's memory rise is its own
    # (freed CPU memory is kept by the allocator and would hide a later, smaller phase).
    rows = []
    out: dict[str, torch.Tensor] = {}
    rows.append(measure("encode_frames/naive", device, naive_frames,
                        lambda: [model.encode_frames(pixels[i:i + 1]) for i in range(naive_frames)], batch_size=1))
    rows.append(measure("encode_frames/batched", device, frames,
                        lambda: out.__setitem__("f", model.encode_frames(pixels, batch_size=batch)), batch_size=batch))
    features = out["f"]
    rows.append(measure("frame_tokens/naive", device, naive_frames,
                        lambda: [model.frame_tokens(features[i:i + 1], QUESTION) for i in range(naive_frames)],
                        block_size=1))
    rows.append(measure("frame_tokens/batched", device, frames, lambda: model.frame_tokens(features, QUESTION),
                        block_size=64))
    for kind in ("encode_frames", "frame_tokens"):
        batched = next(r for r in rows if r["name"] == f"{kind}/batched")
        naive = next(r for r in rows if r["name"] == f"{kind}/naive")
        batched["speedup_vs_naive"] = round(batched["frames_per_s"] / naive["frames_per_s"], 2)
    return rows


# -- full-size EVA-G -------------------------------------------------------------------------------
def eva_flops_per_frame(width: int, depth: int, mlp: int, image_size: int, patch: int = 14) -> float:
    """Multiply-adds x 2 of one frame: patch embedding, then per block qkv, attention, proj and MLP."""
    p = (image_size // patch) ** 2
    n = p + 1
    embed = p * (3 * patch * patch) * width
    block = n * (3 * width * width) + 2 * n * n * width + n * width * width + 2 * n * width * mlp
    return 2.0 * (embed + depth * block)


def bench_full_eva(device: torch.device, dtype: torch.dtype, frames: int, batch: int, depth: int,
                   peak_tflops: float) -> dict:
    width, mlp, size = 1408, 6144, 224
    torch.manual_seed(0)
    with torch.device(device):
        tower = EvaVisionTower(eva_config(width, depth, mlp, size))
        # PyTorch's default init: transformers' own (std 1e-10) would underflow to zeros in fp16.
        for module in tower.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm)):
                module.reset_parameters()
    tower = tower.to(dtype).eval()
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=dtype)

    def run(n: int) -> None:
        with torch.inference_mode():
            for start in range(0, n, batch):
                tower(pixel_values=pixels[: min(batch, n - start)])

    run(min(frames, 2 * batch))  # warm-up
    row = measure("eva_g_full/batched", device, frames, lambda: run(frames), batch_size=batch,
                  dtype=str(dtype).removeprefix("torch."), width=width, depth=depth, mlp=mlp, image_size=size)
    flops = eva_flops_per_frame(width, depth, mlp, size)
    achieved = flops * row["frames_per_s"] / 1e12
    row.update(tflop_per_frame=round(flops / 1e12, 4), achieved_tflops=round(achieved, 2),
               peak_tflops=peak_tflops, fraction_of_peak=round(achieved / peak_tflops, 4))
    return row


# -- report ----------------------------------------------------------------------------------------
def print_table(rows: list[dict]) -> None:
    cols = [("name", 22, "s"), ("frames", 7, "d"), ("seconds", 9, ".2f"), ("frames_per_s", 12, ".1f"),
            ("speedup_vs_naive", 8, ".2f"), ("peak_mib", 10, ".1f"), ("peak_rise_mib", 10, ".1f"),
            ("achieved_tflops", 8, ".1f"), ("fraction_of_peak", 8, ".3f")]
    heads = {"speedup_vs_naive": "x naive", "peak_rise_mib": "rise MiB", "peak_mib": "peak MiB",
             "frames_per_s": "frames/s", "achieved_tflops": "TFLOP/s", "fraction_of_peak": "of peak"}
    print("  ".join(f"{heads.get(c, c):>{w}}" if c != "name" else f"{c:<{w}}" for c, w, _ in cols))
    for r in rows:
        cells = []
        for c, w, fmt in cols:
            v = r.get(c)
            text = "" if v is None else format(v, fmt)
            cells.append(f"{text:<{w}}" if c == "name" else f"{text:>{w}}")
        print("  ".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1024, help="frames per batched measurement")
    parser.add_argument("--naive-frames", type=int, default=None,
                        help="frames for the one-at-a-time loops (default: all on GPU, min(frames, 64) on CPU)")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="model dtype (default: fp32 on CPU, fp16 on CUDA, as the loader chooses)")
    parser.add_argument("--batch", type=int, default=32, help="encode_frames batch size")
    parser.add_argument("--full-eva", choices=["auto", "on", "off"], default="auto",
                        help="full-size EVA-G row (auto: on CUDA only)")
    parser.add_argument("--full-eva-frames", type=int, default=1024)
    parser.add_argument("--full-eva-batch", type=int, default=64)
    parser.add_argument("--eva-depth", type=int, default=39, help="EVA-G depth (smaller only for smoke tests)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "model_core.json")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    naive_frames = args.naive_frames or (args.frames if device.type == "cuda" else min(args.frames, 64))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args.preset, device, dtype, Path(tmp))
    rows = bench_core(model, device, args.frames, naive_frames, args.batch)
    del model
    if args.full_eva == "on" or (args.full_eva == "auto" and device.type == "cuda"):
        rows.append(bench_full_eva(device, torch.bfloat16, args.full_eva_frames, args.full_eva_batch,
                                   args.eva_depth, args.peak_tflops))

    spec = PRESETS[args.preset]
    result = {
        "benchmark": "model_core",
        "preset": args.preset,
        "spec": asdict(spec),
        "question": QUESTION,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "dtype": str(dtype or (torch.float16 if device.type == "cuda" else torch.float32)).removeprefix("torch."),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "total_seconds": round(time.perf_counter() - started, 1),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"model_core: preset {args.preset} on {device} ({result['device_name']}), {result['dtype']}, "
          f"{result['threads']} threads, load average {result['load_average']}")
    print_table(rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
