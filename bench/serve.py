"""Serving benchmark: a real ``llamavid serve`` subprocess with a tiny random checkpoint.

Measured in one run:

a. Time to first token of the first and of the second question about a 5-minute video
   (300 s at 10 fps, sampled at 1 fps: 300 frames, 600 visual tokens), asked with a
   ``video_url`` served from a loopback HTTP server. The first pays for fetching, decoding and
   encoding; the second finds the features in the cache. The ratio first/second is reported.
b. Throughput (requests/s, generated tokens/s) and p50/p99 TTFT at concurrency 1, 8 and 32:
   streaming chat completions about the cached video, greedy, ``max_tokens`` fixed.
c. Server overhead: HTTP end-to-end latency at concurrency 1 minus the model's own time for the
   same work, measured in this process on the same checkpoint: ``LlamaVid.prepare`` (Q-Former +
   prompt) and ``LlamaVid.stream`` to the end, on the same cached features (fp16, as the server
   stores them), the same question and the same greedy budget. Model runs and HTTP requests
   alternate, so background load hits both alike; medians are reported.

    python bench/serve.py [--model DIR] [--max-tokens 32]   -> bench/results/serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Python puts bench/ first on sys.path, where bench/cache.py would shadow the `cache` package.
sys.path[0] = str(REPO)

import httpx  # noqa: E402
import torch  # noqa: E402

from tests.serving import start_server  # noqa: E402
from tests.videos import write_video  # noqa: E402

QUESTION = "What happens in this video, from the beginning to the end?"


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100])."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


STAGES = ("tokens", "prefill", "decode_step")


def server_times(url: str) -> dict[str, float]:
    """Cumulative server-side seconds per model stage and of queueing, from ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "llamavid_stage_seconds_sum" and sample.labels["stage"] in STAGES:
                out[sample.labels["stage"]] = sample.value
            elif sample.name == "llamavid_request_queue_time_seconds_sum":
                out["queue"] = sample.value
            elif sample.name == "llamavid_frames_decoded_total":
                out["frames_decoded"] = sample.value
    return out


def per_request(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """Mean server-side seconds per request for each stage (stage timers include waiting for the
    model thread, which other requests' steps share)."""
    return {f"{k}_s": round((after[k] - before[k]) / requests, 4) for k in (*STAGES, "queue")}


def serve_folder(folder: Path) -> tuple[ThreadingHTTPServer, str]:
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(folder)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def chat_body(video: str, max_tokens: int, stream: bool = True) -> dict:
    body = {"model": "bench", "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}},
                                                      {"type": "text", "text": QUESTION}]}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def timed_stream(client: httpx.AsyncClient, body: dict) -> dict:
    """One streaming chat completion: TTFT (first content delta), end-to-end, tokens."""
    start = time.perf_counter()
    ttft, usage = None, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                usage = chunk["usage"]
    end = time.perf_counter() - start
    return {"ttft": ttft if ttft is not None else end, "e2e": end, "tokens": usage["completion_tokens"],
            "visual_tokens": usage["visual_tokens"]}


async def load_level(url: str, video: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        for _ in range(min(concurrency, 4)):  # warm the connections and the code paths
            await timed_stream(client, chat_body(video, max_tokens))
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)
        results: list[dict] = []

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                results.append(await timed_stream(client, chat_body(video, max_tokens)))

        before = await asyncio.to_thread(server_times, url)
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        after = await asyncio.to_thread(server_times, url)
    ttfts = [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency, "requests": len(results), "wall_s": round(wall, 3),
        "requests_per_s": round(len(results) / wall, 2), "generated_tokens_per_s": round(tokens / wall, 1),
        "mean_completion_tokens": round(tokens / len(results), 2),
        "ttft_p50_s": round(percentile(ttfts, 50), 4), "ttft_p99_s": round(percentile(ttfts, 99), 4),
        "e2e_p50_s": round(percentile([r["e2e"] for r in results], 50), 4),
        "e2e_p99_s": round(percentile([r["e2e"] for r in results], 99), 4),
        "server_mean_per_request": per_request(before, after, len(results)),
    }


def model_runner(model_dir: Path, video_path: Path, max_frames: int, max_tokens: int):
    """The in-process reference: the same work as one cached-video request, without the server."""
    from model.conversation import Message
    from model.llama_vid import VisualInput
    from model.loader import load_llamavid
    from model.pipeline import encode_video, plan_video
    from model.video import FrameSampling

    model = load_llamavid(model_dir, device="cpu")
    video, indices = plan_video(video_path.read_bytes(), FrameSampling(1.0, max_frames))
    features = encode_video(model, video, indices).features.to(torch.float16)  # as the cache serves them
    params = model.params(max_new_tokens=max_tokens)

    def run() -> tuple[float, float, int]:
        start = time.perf_counter()
        prepared = model.prepare([Message("user", QUESTION)], VisualInput(features, "video"))
        prepared_at = time.perf_counter()
        tokens = sum(1 for _ in model.stream(prepared, params))
        end = time.perf_counter()
        return end - start, prepared_at - start, tokens

    return run, len(indices)


async def overhead(url: str, video_id: str, run_model, rounds: int, max_tokens: int) -> dict:
    http_e2e, http_ttft, model_s, prepare_s, tokens = [], [], [], [], []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for _ in range(3):
            await timed_stream(client, chat_body(video_id, max_tokens))
            await asyncio.to_thread(run_model)
        before = await asyncio.to_thread(server_times, url)
        for _ in range(rounds):
            r = await timed_stream(client, chat_body(video_id, max_tokens))
            http_e2e.append(r["e2e"])
            http_ttft.append(r["ttft"])
            total, prepare, n = await asyncio.to_thread(run_model)
            model_s.append(total)
            prepare_s.append(prepare)
            tokens.append((r["tokens"], n))
        after = await asyncio.to_thread(server_times, url)
    assert all(a == b for a, b in tokens), f"server and model generated different token counts: {tokens[:5]}"
    e2e, model_time = statistics.median(http_e2e), statistics.median(model_s)
    stages = per_request(before, after, rounds)
    server_model = sum(stages[f"{k}_s"] for k in STAGES)
    return {
        "rounds": rounds, "completion_tokens": tokens[0][0],
        "http_e2e_median_s": round(e2e, 4), "model_median_s": round(model_time, 4),
        "model_prepare_median_s": round(statistics.median(prepare_s), 4),
        "overhead_median_s": round(e2e - model_time, 4),
        "overhead_fraction_of_e2e": round((e2e - model_time) / e2e, 3),
        "http_ttft_median_s": round(statistics.median(http_ttft), 4),
        "http_e2e_mean_s": round(statistics.fmean(http_e2e), 4),
        "server_stages_mean_per_request": stages,
        "server_model_mean_s": round(server_model, 4),
        "overhead_vs_server_stages_mean_s": round(statistics.fmean(http_e2e) - server_model, 4),
    }


async def main_async(args: argparse.Namespace, workdir: Path) -> dict:
    load_start = round(os.getloadavg()[0], 2)  # other processes on the machine skew every number
    if args.model:
        model_dir = Path(args.model)
    else:
        from model.tools.tiny import make_tiny

        model_dir = make_tiny(workdir / "llama-vid-tiny", "tiny", fmt="bin", num_shards=2)
    media = workdir / "served"  # not "media": that is the server's own upload folder
    media.mkdir()
    t0 = time.perf_counter()
    video_path = write_video(media / "five-minutes.mp4", seconds=args.seconds, fps=args.source_fps,
                             size=(args.height, args.width))
    print(f"video: {args.seconds:g} s at {args.source_fps:g} fps, {args.width}x{args.height}, "
          f"{video_path.stat().st_size} bytes (written in {time.perf_counter() - t0:.1f} s)", flush=True)
    host, host_url = serve_folder(media)
    frames = int(args.seconds)  # 1 fps
    process = start_server(workdir, model_dir, max_frames=frames, queue_size=256, max_running=8)
    try:
        url = process.url
        video_url = f"{host_url}/{video_path.name}"
        # (a) first vs second question about the video.
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            first = await timed_stream(client, chat_body(video_url, args.max_tokens))
            second = await timed_stream(client, chat_body(video_url, args.max_tokens))
            plain = await client.post("/v1/chat/completions", json=chat_body(video_url, 1, stream=False))
            video_id = plain.json()["llamavid"]["video_id"]
        assert first["visual_tokens"] == second["visual_tokens"] == 2 * frames, (first, second)
        ttft = {"frames": frames, "visual_tokens": first["visual_tokens"],
                "first_ttft_s": round(first["ttft"], 4), "second_ttft_s": round(second["ttft"], 4),
                "ratio_first_over_second": round(first["ttft"] / second["ttft"], 1)}
        print(f"(a) TTFT first {ttft['first_ttft_s']:.3f} s, second {ttft['second_ttft_s']:.4f} s: "
              f"{ttft['ratio_first_over_second']}x", flush=True)

        # (b) throughput.
        levels = []
        for concurrency in args.concurrency:
            requests = max(args.min_requests, 4 * concurrency)
            level = await load_level(url, video_id, concurrency, requests, args.max_tokens)
            levels.append(level)
            print(f"(b) c={concurrency:>2}: {level['requests_per_s']:7.2f} req/s, "
                  f"{level['generated_tokens_per_s']:8.1f} tok/s, "
                  f"TTFT p50 {level['ttft_p50_s'] * 1000:7.1f} ms, "
                  f"p99 {level['ttft_p99_s'] * 1000:7.1f} ms; per request: "
                  + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in level["server_mean_per_request"].items()),
                  flush=True)

        # (c) overhead at concurrency 1.
        run_model, model_frames = await asyncio.to_thread(
            model_runner, model_dir, video_path, frames, args.max_tokens)
        assert model_frames == frames
        over = await overhead(url, video_id, run_model, args.overhead_rounds, args.max_tokens)
        print(f"(c) HTTP e2e {over['http_e2e_median_s'] * 1000:.1f} ms, "
              f"model {over['model_median_s'] * 1000:.1f} ms"
              f" -> overhead {over['overhead_median_s'] * 1000:.1f} ms "
              f"({over['overhead_fraction_of_e2e'] * 100:.0f}% of e2e); the server's own model stages "
              f"{over['server_model_mean_s'] * 1000:.1f} ms of "
              f"{over['http_e2e_mean_s'] * 1000:.1f} ms mean e2e "
              f"-> overhead {over['overhead_vs_server_stages_mean_s'] * 1000:.1f} ms", flush=True)
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            metrics = (await client.get("/metrics")).text
            models = (await client.get("/v1/models")).json()["data"][0]
    finally:
        process.stop()
        host.shutdown()
    return {
        "benchmark": "serve",
        "setup": {
            "model": str(model_dir) if args.model else "model.tools.tiny.make_tiny('tiny') (random weights)",
            "model_id": models["id"], "device": models["llamavid"]["device"],
            "dtype": models["llamavid"]["dtype"], "context_length": models["max_model_len"],
            "tokens_per_frame": models["llamavid"]["tokens_per_frame"],
            "video": {"seconds": args.seconds, "source_fps": args.source_fps,
                      "size": [args.width, args.height],
                      "sampling_fps": 1.0, "frames": frames, "bytes": video_path.stat().st_size},
            "max_tokens": args.max_tokens, "greedy": True,
            "server": {"max_running": 8, "queue_size": 256, "max_frames": frames},
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "platform": platform.platform(),
                        "load_average_1m": {"start": load_start, "end": round(os.getloadavg()[0], 2)}},
        },
        "ttft_first_vs_second": ttft,
        "throughput": levels,
        "overhead_concurrency_1": over,
        "server_frames_decoded_total": _metric(metrics, "llamavid_frames_decoded_total"),
    }


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: a fresh tiny random one)")
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--source-fps", type=float, default=10.0)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--min-requests", type=int, default=32)
    parser.add_argument("--overhead-rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve.json")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llamavid-bench-serve-") as tmp:
        results = asyncio.run(main_async(args, Path(tmp)))
    results["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} ({results['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
