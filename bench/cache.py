"""Feature-cache benchmark: how fast an hour of cached per-frame features comes back.

Measured in one run, against the Redis at ``--redis-url`` (keys under ``--namespace``, all removed
at the end):

1. Redis -> one [T, N, C] tensor through ``RedisFeatureStore``: ``get_video`` (``--connections``
   sockets in parallel, each value received straight into the output), ``get_frames`` +
   ``torch.stack`` (the generic path), and ``get_video`` on the old single-connection ``MGET``
   path (``connections=0``) for a before/after in the same run.
2. Baselines: the same keys fetched with redis-py pipelined ``GET`` s (hiredis parser when
   installed) of ``--chunk-size`` keys and no decoding, and ``redis-benchmark`` (C client)
   GETting one of the same blobs as many times as there are frames, with ``-c``/``-P`` from
   ``--bench-clients``/``--bench-pipeline``. Each ours/baseline rate ratio is taken per round,
   then the median is reported (``ratio_<path>_vs_redispy``, ``ratio_<path>_vs_c_client``), and
   the same for CPU seconds (``cpu_ratio_*``: the baseline's CPU over ours, redis-benchmark's
   counted from its child-process rusage), which is steadier when other jobs load the machine.
3. The hot tier: ``TieredFeatureStore.get_video`` once through Redis (promoting) and then from
   memory, with the cold tier's byte counter showing what the repeat moved over the network.
4. int8 vs fp16: stored bytes per frame, reconstruction error on ViT-like random features, and
   the Redis read rate of an int8 store.

The variants of 1-2 (and of 4's reads) run interleaved, round after round, so load from other
processes hits them alike; medians are reported. ``--distinct`` random frames are reused
cyclically and written in chunks, so the generator never holds the hour in memory.

    python bench/cache.py [--frames 3600 --tokens 257 --dim 1408]   -> bench/results/cache.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

# This script is bench/cache.py, so Python puts bench/ first on sys.path and `import cache` would
# import the script itself; point that entry at the repository root instead.
REPO = Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)

import redis  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
import torch  # noqa: E402
from redis.utils import HIREDIS_AVAILABLE  # noqa: E402

from cache import (  # noqa: E402
    Manifest,
    MemoryFeatureStore,
    RedisFeatureStore,
    TieredFeatureStore,
    decode,
    digest_bytes,
    encode,
)
from cache.keys import FeatureKeys  # noqa: E402

ENCODER = "bench/eva-vit-g@224/float16"
Variant = Callable[[], Awaitable[object]]


def vit_like(frames: int, tokens: int, dim: int, *, seed: int) -> torch.Tensor:
    """Random features shaped like EVA ViT output: Gaussian channels, six channels 20-40x larger
    (the outlier dimensions ViTs develop) and a log-normal scale per token."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(frames, tokens, dim, generator=generator)
    outliers = torch.randperm(dim, generator=generator)[:6]
    x[..., outliers] *= torch.linspace(20, 40, len(outliers))
    x *= torch.empty(frames, tokens, 1).log_normal_(0.0, 0.25, generator=generator)
    return x.to(torch.float16)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.float() - exact.float()).norm() / exact.float().norm())


def video_relative_error(video: torch.Tensor, base: torch.Tensor) -> float:
    """‖q−x‖/‖x‖ over a whole video of cyclically reused frames, a block at a time (fp32 copies
    of the hour at once would take ~10 GB)."""
    exact, error, norm = base.float(), 0.0, 0.0
    for first in range(0, video.shape[0], base.shape[0]):
        block = video[first : first + base.shape[0]].float()
        error += float((block - exact[: len(block)]).square().sum())
        norm += float(exact[: len(block)].square().sum())
    return (error / norm) ** 0.5


def rss_gb() -> float | None:
    """Resident memory of this process (Linux), to show the run stays within bounds."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return None


@dataclass
class Timing:
    """Per-round wall-clock and process CPU seconds (CPU includes decode threads; it is the
    steadier number when other processes compete for the machine)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


async def interleaved(
    rounds: int,
    variants: dict[str, Variant],
    check: Callable[[str, object], None],
    seconds_of: frozenset[str] | set[str] = frozenset(),
) -> dict[str, Timing]:
    """Time each variant once per round, in turn; each result is checked, then freed.

    Variants named in ``seconds_of`` time themselves (an external tool): they return their
    (wall, CPU) seconds.
    """
    timings = {name: Timing() for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            gc.collect()
            wall, cpu = time.perf_counter(), time.process_time()
            result = await run()
            elapsed = time.perf_counter() - wall
            cpu = time.process_time() - cpu
            if name in seconds_of:
                elapsed, cpu = result  # type: ignore[misc]
            timings[name].wall.append(elapsed)
            timings[name].cpu.append(cpu)
            check(name, result)
            del result
    return timings


def rate(nbytes: int, timing: Timing) -> dict[str, object]:
    median = statistics.median(timing.wall)
    return {
        "seconds_median": median,
        "seconds_all": timing.wall,
        "gb_per_s": nbytes / median / 1e9,
        "cpu_seconds_median": statistics.median(timing.cpu),
    }


def check_video(video: object, base: torch.Tensor, frames: int) -> None:
    assert isinstance(video, torch.Tensor) and video.shape[0] == frames, "incomplete read"
    for t in (0, 1, len(base), frames // 2, frames - 1):
        if t < frames and not torch.equal(video[t], base[t % len(base)]):
            raise AssertionError(f"frame {t} came back wrong")


async def write_video(store: RedisFeatureStore, digest: str, base: torch.Tensor, frames: int) -> float:
    start = time.perf_counter()
    for first in range(0, frames, len(base)):
        count = min(len(base), frames - first)
        await store.put_frames(ENCODER, digest, range(first, first + count), base[:count])
    return time.perf_counter() - start


def redis_benchmark_command(url: str, key: str, requests: int, clients: int, pipeline: int) -> list[str] | None:
    """redis-benchmark's C client GETting our own blob ``key`` (``-d`` would size only its own
    keys; GET of a real blob keeps the value identical), or ``None`` without the tool."""
    tool, parsed = shutil.which("redis-benchmark"), urlparse(url)
    if tool is None or parsed.scheme != "redis" or parsed.password:
        return None
    host, port, db = parsed.hostname or "127.0.0.1", parsed.port or 6379, parsed.path.strip("/") or "0"
    flags = f"-h {host} -p {port} --dbnum {db} -n {requests} -c {clients} -P {pipeline} --csv GET"
    return [tool, *flags.split(), key]


def run_redis_benchmark(command: list[str]) -> tuple[float, float]:
    """Requests per second that one redis-benchmark run reports, and the CPU seconds it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    output = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return float(output.strip().splitlines()[-1].split(",")[1].strip('"')), cpu


def make_manifest(digest: str, frames: int, tokens: int, dim: int) -> Manifest:
    return Manifest(
        video_digest=digest,
        encoder_id=ENCODER,
        sampling={"fps": 1.0, "max_frames": frames},
        frame_indices=list(range(frames)),
        timestamps=[float(t) for t in range(frames)],
        source_fps=1.0,
        num_source_frames=frames,
        duration=float(frames),
        feature_shape=[tokens, dim],
        dtype="float16",
    )


async def redis_reads(args, client, store, manifest, base, blob_bytes) -> dict[str, object]:
    """Sections 1 and 2: our read paths against redis-py and the C client, interleaved per round.

    redis-benchmark GETs one of the same blobs ``frames`` times per round, so each round moves
    the same bytes through the C client as through ours; its time is requests / its reported rate.
    """
    digest, frames = manifest.video_digest, manifest.num_frames
    keys = FeatureKeys(args.namespace).frames(ENCODER, digest, manifest.frame_indices)
    sequential = RedisFeatureStore(client, namespace=args.namespace, chunk_size=args.chunk_size, connections=0)
    command = redis_benchmark_command(args.redis_url, keys[0], frames, args.bench_clients, args.bench_pipeline)

    async def pipelined_get() -> int:
        total = 0
        for start in range(0, len(keys), args.chunk_size):
            pipe = client.pipeline(transaction=False)
            for key in keys[start : start + args.chunk_size]:
                pipe.get(key)
            total += sum(map(len, await pipe.execute()))
        return total

    async def c_client() -> tuple[float, float]:
        assert command is not None
        rps, cpu = await asyncio.to_thread(run_redis_benchmark, command)
        return frames / rps, cpu  # seconds for the same number of GETs

    async def frames_and_stack() -> torch.Tensor:
        return torch.stack(await store.get_frames(ENCODER, digest, manifest.frame_indices))

    def check(name: str, result: object) -> None:
        if name == "redispy_pipelined_get":
            assert result == blob_bytes, "redis-py GETs missed keys"
        elif name != "redis_benchmark_c_client_get":
            check_video(result, base, frames)

    variants: dict[str, Variant] = {
        "redispy_pipelined_get": pipelined_get,
        "redis_get_video": lambda: store.get_video(manifest),
        "redis_get_frames_stack": frames_and_stack,
        "redis_get_video_sequential_mget": lambda: sequential.get_video(manifest),
    }
    if command is not None:
        variants["redis_benchmark_c_client_get"] = c_client
    times = await interleaved(args.repeats, variants, check, seconds_of={"redis_benchmark_c_client_get"})
    out: dict[str, object] = {name: rate(blob_bytes, t) for name, t in times.items()}
    if command is not None:
        out["redis_benchmark_c_client_get"]["args"] = " ".join(command[1:])
    baselines = {"redispy": "redispy_pipelined_get", "c_client": "redis_benchmark_c_client_get"}
    for name in ("redis_get_video", "redis_get_frames_stack", "redis_get_video_sequential_mget"):
        for short, baseline in baselines.items():
            if baseline in times:  # rate ratio per round (same load), then the median
                ratios = [b / ours for b, ours in zip(times[baseline].wall, times[name].wall, strict=True)]
                out[f"ratio_{name}_vs_{short}"] = statistics.median(ratios)
                cpu = [b / ours for b, ours in zip(times[baseline].cpu, times[name].cpu, strict=True)]
                out[f"cpu_ratio_{name}_vs_{short}"] = statistics.median(cpu)  # >1: we use less CPU
    out["parallel_read_open_connections"] = store.open_connections
    return out


async def hot_tier(args, store, manifest, base, tensor_bytes) -> dict[str, object]:
    """Section 3: a tiered read through Redis, then repeats served by the hot tier."""
    hot = MemoryFeatureStore(int(tensor_bytes * 1.1))
    tiered = TieredFeatureStore(hot, store)
    cold_start = store.stats().bytes_read
    start = time.perf_counter()
    check_video(await tiered.get_video(manifest), base, manifest.num_frames)
    first_s = time.perf_counter() - start
    cold_promoted = store.stats().bytes_read

    def check_hot(name: str, result: object) -> None:
        if name == "get_video":
            check_video(result, base, manifest.num_frames)
        else:  # a list of references to the hot tier's tensors
            assert isinstance(result, list) and len(result) == manifest.num_frames
            assert torch.equal(result[-1], base[(manifest.num_frames - 1) % len(base)])

    times = await interleaved(
        args.repeats,
        {
            "get_video": lambda: tiered.get_video(manifest),
            "get_frames": lambda: tiered.get_frames(ENCODER, manifest.video_digest, manifest.frame_indices),
        },
        check_hot,
    )
    memory = rss_gb()
    await tiered.hot.close()
    return {
        "first_read_through_redis": {
            "seconds": first_s,
            "gb_per_s": tensor_bytes / first_s / 1e9,
            "cold_bytes_read": cold_promoted - cold_start,
        },
        "repeat_get_video_from_hot": rate(tensor_bytes, times["get_video"]),
        "repeat_get_frames_from_hot_no_stack": {
            "seconds_median": statistics.median(times["get_frames"].wall)
        },
        "cold_bytes_read_by_repeats": store.stats().bytes_read - cold_promoted,
        "rss_gb_with_hot_tier": memory,
    }


async def int8_vs_fp16(args, fp16_store, int8_store, manifest, base) -> dict[str, object]:
    """Section 4: size, error and read rate of int8 blobs against fp16 ones."""
    fp16_blob, int8_blob = encode(base[0], "float16"), encode(base[0], "int8")
    errors = [relative_error(decode(encode(frame, "int8")), frame) for frame in base]
    gauss = torch.randn(base.shape, generator=torch.Generator().manual_seed(1)).half()
    gauss_errors = [relative_error(decode(encode(frame, "int8")), frame) for frame in gauss]
    write_s = await write_video(int8_store, manifest.video_digest, base, manifest.num_frames)
    whole: list[float] = []

    def check(name: str, video: object) -> None:
        if name == "fp16":
            check_video(video, base, manifest.num_frames)
        else:
            assert isinstance(video, torch.Tensor)
            whole.append(video_relative_error(video, base))

    times = await interleaved(
        args.repeats,
        {"int8": lambda: int8_store.get_video(manifest), "fp16": lambda: fp16_store.get_video(manifest)},
        check,
    )
    frames = manifest.num_frames
    return {
        "bytes_per_frame_fp16": len(fp16_blob),
        "bytes_per_frame_int8": len(int8_blob),
        "int8_size_ratio": len(int8_blob) / len(fp16_blob),
        "rel_error_vit_like_mean": statistics.fmean(errors),
        "rel_error_vit_like_max": max(errors),
        "rel_error_vit_like_whole_video": whole[0],
        "rel_error_gaussian_mean": statistics.fmean(gauss_errors),
        "int8_write_seconds": write_s,
        "int8_get_video_frames_per_s": frames / statistics.median(times["int8"].wall),
        "fp16_get_video_frames_per_s": frames / statistics.median(times["fp16"].wall),
        "int8_get_video_cpu_seconds_median": statistics.median(times["int8"].cpu),
        "fp16_get_video_cpu_seconds_median": statistics.median(times["fp16"].cpu),
        "int8_get_video": rate(int8_store.stats().bytes_read // args.repeats, times["int8"]),
    }


async def bench(args: argparse.Namespace) -> dict[str, object]:
    client = aioredis.Redis.from_url(args.redis_url, decode_responses=False)
    parallel = {"connections": args.connections, "window": args.window}
    fp16_store = RedisFeatureStore(client, namespace=args.namespace, chunk_size=args.chunk_size, **parallel)
    int8_store = RedisFeatureStore(
        client, namespace=f"{args.namespace}:int8", fmt="int8", chunk_size=args.chunk_size, **parallel
    )
    digest = digest_bytes(f"bench-video-{uuid.uuid4()}".encode())
    manifest = make_manifest(digest, args.frames, args.tokens, args.dim)
    base = vit_like(args.distinct, args.tokens, args.dim, seed=0)
    tensor_bytes = args.frames * args.tokens * args.dim * 2
    results: dict[str, object] = {"load_average_start": os.getloadavg()}
    try:
        write_s = await write_video(fp16_store, digest, base, args.frames)
        blob_bytes = fp16_store.stats().bytes_written
        results["write_fp16"] = {"seconds": write_s, "gb_per_s": blob_bytes / write_s / 1e9}
        results.update(await redis_reads(args, client, fp16_store, manifest, base, blob_bytes))
        results["rss_gb_after_redis_reads"] = rss_gb()
        results["hot_tier"] = await hot_tier(args, fp16_store, manifest, base, tensor_bytes)
        results["int8_vs_fp16"] = await int8_vs_fp16(args, fp16_store, int8_store, manifest, base)
    finally:
        removed = await fp16_store.delete_video(digest) + await int8_store.delete_video(digest)
        pattern = FeatureKeys(args.namespace).namespace_pattern()
        leftovers = [key async for key in client.scan_iter(match=pattern, count=1000)]
        if leftovers:
            await client.unlink(*leftovers)
        results["keys_deleted_at_end"] = removed + len(leftovers)
        server = await client.info("server")
        await fp16_store.close()
        await int8_store.close()
        await client.aclose()
    results["load_average_end"] = os.getloadavg()
    results["peak_rss_gb"] = _peak_rss_gb()
    results["setup"] = {
        "frames": args.frames,
        "tokens": args.tokens,
        "dim": args.dim,
        "distinct_frames": args.distinct,
        "chunk_size": args.chunk_size,
        "connections": args.connections,
        "window": args.window,
        "redis_benchmark_clients": args.bench_clients,
        "redis_benchmark_pipeline": args.bench_pipeline,
        "repeats": args.repeats,
        "feature_tensor_bytes": tensor_bytes,
        "fp16_blob_bytes_total": blob_bytes,
        "redis_url": args.redis_url,
        "redis_version": server.get("redis_version"),
        "redis_py": redis.__version__,
        "hiredis": HIREDIS_AVAILABLE,
        "crc32": crc32_impl(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
    return results


def crc32_impl() -> str:
    """Which CRC-32 the serialiser verifies with (ISA-L, or zlib's slower one)."""
    from cache import serialize

    return f"{serialize._crc32.__module__}.{serialize._crc32.__name__}"


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def print_table(r: dict) -> None:
    s, hot, q = r["setup"], r["hot_tier"], r["int8_vs_fp16"]
    gigabytes = s["feature_tensor_bytes"] / 1e9
    load = f"{r['load_average_start'][0]:.1f} -> {r['load_average_end'][0]:.1f}"
    print(
        f"\n{s['frames']} frames x {s['tokens']}x{s['dim']} fp16 = {gigabytes:.2f} GB; {s['chunk_size']} keys"
    )
    print(f"per MGET; median of {s['repeats']} interleaved rounds; load average {load}")
    rows = [
        ("Redis -> [T,N,C]: get_video (parallel)", r["redis_get_video"]),
        ("Redis -> [T,N,C]: get_frames + stack", r["redis_get_frames_stack"]),
        ("Redis -> [T,N,C]: get_video, 1 conn MGET", r["redis_get_video_sequential_mget"]),
        ("baseline: redis-py pipelined GET, no decode", r["redispy_pipelined_get"]),
        ("baseline: redis-benchmark GET (C client)", r.get("redis_benchmark_c_client_get")),
        ("tiered, first read (Redis + promote)", hot["first_read_through_redis"]),
        ("tiered, repeat get_video (hot tier)", hot["repeat_get_video_from_hot"]),
        ("int8 store: get_video", q["int8_get_video"]),
    ]
    print(f"{'path':<46}{'wall s':>8}{'GB/s':>7}{'CPU s':>8}")
    for name, row in rows:
        if row is None:
            continue
        cpu = f"{row['cpu_seconds_median']:>8.2f}" if "cpu_seconds_median" in row else ""
        print(f"{name:<46}{row.get('seconds_median', row.get('seconds')):>8.3f}{row['gb_per_s']:>7.2f}{cpu}")
    for name in ("redis_get_video", "redis_get_frames_stack", "redis_get_video_sequential_mget"):
        ratios = [
            f"vs {b} {r[f'ratio_{name}_vs_{b}']:.2f}x (CPU {r[f'cpu_ratio_{name}_vs_{b}']:.2f}x)"
            for b in ("redispy", "c_client")
            if f"ratio_{name}_vs_{b}" in r
        ]
        print(f"{name}: " + ", ".join(ratios))
    hot_ms = hot["repeat_get_frames_from_hot_no_stack"]["seconds_median"] * 1e3
    print(
        f"hot get_frames (references) {hot_ms:.1f} ms; "
        f"cold bytes read by repeats: {hot['cold_bytes_read_by_repeats']}"
    )
    print(
        f"int8: {q['bytes_per_frame_int8']} vs {q['bytes_per_frame_fp16']} bytes/frame "
        f"({q['int8_size_ratio']:.3f}); rel. error ViT-like {q['rel_error_vit_like_mean']:.4f}, "
        f"Gaussian {q['rel_error_gaussian_mean']:.4f}; reads {q['int8_get_video_frames_per_s']:.0f} "
        f"vs {q['fp16_get_video_frames_per_s']:.0f} frames/s fp16"
    )
    print(f"peak RSS {r['peak_rss_gb']:.1f} GB; keys deleted at end: {r['keys_deleted_at_end']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=3600)
    parser.add_argument("--tokens", type=int, default=257)
    parser.add_argument("--dim", type=int, default=1408)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--namespace", default=f"bench:cache:{uuid.uuid4().hex[:8]}")
    parser.add_argument("--distinct", type=int, default=64, help="distinct random frames, reused cyclically")
    parser.add_argument("--chunk-size", type=int, default=32, help="keys per MGET / SET pipeline")
    parser.add_argument("--connections", type=int, default=4, help="parallel read sockets (0: MGET)")
    parser.add_argument("--window", type=int, default=4, help="GETs per write on each socket")
    parser.add_argument("--bench-clients", type=int, default=4, help="redis-benchmark -c")
    parser.add_argument("--bench-pipeline", type=int, default=4, help="redis-benchmark -P")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cache.json")
    args = parser.parse_args()
    args.distinct = min(args.distinct, args.frames)
    results = asyncio.run(bench(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
