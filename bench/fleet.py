"""Fleet benchmark: cache-affine routing and parallel extraction of one long video, on real processes.

A private ``redis-server``, one ``llamavid api`` and ``llamavid worker`` processes (the tiny random
model: the CPU stands in for the GPUs). Each worker stands for one GPU, so it is pinned to one core
(``taskset``) with one thread, in every run alike. Two measurements, each against a baseline taken
in the same run:

* **Routing.** 2 workers, 10 uploaded videos, 4 questions per video in a random order, asked one
  at a time so that each question's feature source (the worker's hot tier, the shared Redis
  cache) is read off the workers' ``llamavid_question_features_total``. Repeated questions (all
  but a video's first) served from the hot tier, with ``routing=affine`` against
  ``routing=shared`` (whichever worker reads the queue first). Goal: >= 90 % with affine. As in a
  real fleet (a host holds a few hour-long videos, 2.6 GB each, the fleet many more), a worker's
  hot tier holds 60 % of the videos' features (measured first, with one worker): enough for the
  videos a worker owns, not for all of them.
* **Parallel extraction.** A 20-minute 720p video (ffmpeg testsrc2, 10 fps, H.264, sampled at
  1 fps: 1,200 frames), from upload to ready, extracted by 1 worker and by 2 workers, alternately,
  three times each (medians: this machine's speed drifts by 2x within minutes). Goal: 2 workers
  <= 0.6x the time of 1. The same run measures the machine's own ceiling: ``ffmpeg -vf fps=1`` over
  the whole video on one core against its two halves on two cores at once. Then again with 2
  workers, the one owning the extraction SIGKILLed at 40 %: the survivor's
  ``llamavid_frames_recomputed_total`` must be 0.

    python bench/fleet.py -> bench/results/fleet.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests.redis.conftest import Deployment, PrivateRedis, start_deployment, wait_for  # noqa: E402
from tests.serving import free_port  # noqa: E402
from tests.videos import write_video  # noqa: E402

SOURCES = ("hot", "cold", "extracted")
ONE_CORE_EACH = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def pinned(i: int) -> list[str]:
    """Worker ``i`` on core ``i`` (modulo the cores there are)."""
    cores = sorted(os.sched_getaffinity(0))
    return ["taskset", "-c", str(cores[i % len(cores)])]


def deploy(tmp: Path, checkpoint: Path, redis: PrivateRedis, workers: int, **settings: object) -> Deployment:
    # The worker processes read OMP_NUM_THREADS from the environment they are spawned with.
    return start_deployment(tmp, checkpoint, workers=workers, redis_url=redis.url, worker_prefix=pinned,
                            visibility_timeout=2, **settings)


def upload(d: Deployment, path: Path, fps: float | None = None) -> dict:
    data = {"fps": str(fps)} if fps else {}
    reply = httpx.post(d.url + "/v1/videos", files={"file": (path.name, path.read_bytes(), "video/mp4")},
                       data=data, timeout=120)
    reply.raise_for_status()
    return reply.json()


_http = httpx.Client(timeout=10)  # one client: a new one per poll costs the CPU the workers measure with


def status(d: Deployment, video_id: str) -> dict:
    return _http.get(f"{d.url}/v1/videos/{video_id}").json()


def wait_ready(d: Deployment, video_id: str, timeout: float = 600) -> dict:
    def ready() -> dict | None:
        record = status(d, video_id)
        if record["status"] == "failed":
            raise RuntimeError(f"extraction failed: {record}")
        return record if record["status"] == "ready" else None

    return wait_for(ready, timeout, f"video {video_id}", interval=0.25)


# -- routing ----------------------------------------------------------------------------------------
def working_set(tmp: Path, checkpoint: Path, redis: PrivateRedis, videos: list[Path]) -> int:
    """Bytes of the videos' features, as Redis stores them (one worker extracts them all)."""
    d = deploy(tmp, checkpoint, redis, 1, encode_batch=8)
    try:
        for video_id in [upload(d, path)["id"] for path in videos]:
            wait_ready(d, video_id)
        keys = list(d.redis.scan_iter(match=f"{d.namespace}:v*:f:*", count=1000))
        return sum(d.redis.strlen(key) for key in keys)
    finally:
        d.stop()


def routing_run(tmp: Path, checkpoint: Path, redis: PrivateRedis, videos: list[Path], mode: str,
                seed: int, hot_bytes: int) -> dict:
    d = deploy(tmp, checkpoint, redis, 2, routing=mode, encode_batch=8, cache_bytes=hot_bytes)
    try:
        ids = [upload(d, path)["id"] for path in videos]
        for video_id in ids:
            wait_ready(d, video_id)
        order = [(video_id, q) for video_id in ids for q in range(4)]
        random.Random(seed).shuffle(order)
        client = d.openai(timeout=120)
        seen: set[str] = set()
        first, repeated = [], []
        for video_id, q in order:
            before = [{s: w.metric("llamavid_question_features_total", source=s) for s in SOURCES} for w in d.workers]
            client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, messages=[
                {"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_id}},
                                             {"type": "text", "text": f"Question {q}: what happens?"}]}])
            after = [{s: w.metric("llamavid_question_features_total", source=s) for s in SOURCES} for w in d.workers]
            [(worker, source)] = [(i, s) for i in range(len(d.workers)) for s in SOURCES if after[i][s] > before[i][s]]
            (repeated if video_id in seen else first).append({"worker": worker, "source": source})
            seen.add(video_id)
        return {
            "routing": mode,
            "questions": len(order),
            "hot_tier_bytes_per_worker": hot_bytes,
            "repeated_hot_ratio": sum(r["source"] == "hot" for r in repeated) / len(repeated),
            "first_question_sources": {s: sum(r["source"] == s for r in first) for s in SOURCES},
            "repeated_question_sources": {s: sum(r["source"] == s for r in repeated) for s in SOURCES},
            "questions_per_worker": [sum(r["worker"] == i for r in first + repeated) for i in range(2)],
            "cold_bytes_read": d.total("llamavid_feature_cache_bytes_read_total", tier="cold"),
            "routes": {reason: d.api_metric("llamavid_route_total", queue="questions", reason=reason)
                       for reason in ("affine", "owner_busy", "owner_gone", "no_media", "shared")},
        }
    finally:
        d.stop()


# -- extraction -------------------------------------------------------------------------------------
def long_video(path: Path, minutes: float) -> Path:
    """720p, so that decoding costs per frame what it costs on real videos (a tiny frame would leave
    only the fixed costs to compare)."""
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size=1280x720:rate=10:duration={minutes * 60}", "-c:v", "libx264", "-preset",
                    "ultrafast", "-g", "100", "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def ffmpeg_ceiling(video: Path, minutes: float) -> dict:
    """Decoding at 1 fps: the whole video on one core, and its two halves on two cores at once."""
    def decode(core: int, start: float, seconds: float) -> subprocess.Popen:
        return subprocess.Popen(["taskset", "-c", str(core), "ffmpeg", "-v", "error", "-threads", "1", "-ss",
                                 str(start), "-t", str(seconds), "-i", str(video), "-vf", "fps=1", "-f", "null", "-"])

    half = minutes * 30
    cores = sorted(os.sched_getaffinity(0))
    started = time.monotonic()
    decode(cores[0], 0, 2 * half).wait()
    whole = time.monotonic() - started
    started = time.monotonic()
    for process in [decode(cores[0], 0, half), decode(cores[-1], half, half)]:
        process.wait()
    halves = time.monotonic() - started
    return {"whole_one_core_seconds": round(whole, 2), "halves_two_cores_seconds": round(halves, 2),
            "ratio": round(halves / whole, 3)}


def extraction_run(tmp: Path, checkpoint: Path, redis: PrivateRedis, video: Path, workers: int, *,
                   kill_at: float | None = None, range_frames: int | None = None) -> dict:
    settings = {"extract_range_frames": range_frames} if range_frames else {}
    d = deploy(tmp, checkpoint, redis, workers, encode_batch=32, **settings)
    try:
        started = time.monotonic()
        record = upload(d, video, fps=1)
        accepted = time.monotonic()
        victim = None
        if kill_at is not None:
            wait_for(lambda: status(d, record["id"])["frames_done"] >= kill_at * record["frames_total"], 600,
                     "the kill point", interval=0.1)
            victim = d.extraction_owner()
            victim.process.kill()
        final = wait_ready(d, record["id"])
        seconds = time.monotonic() - accepted
        live = d.live_workers()
        return {
            "workers": workers, "frames": final["frames_total"], "seconds": round(seconds, 2),
            "upload_seconds": round(accepted - started, 2),
            "frames_per_second": round(final["frames_total"] / seconds, 1),
            "killed_owner_at": kill_at,
            "recomputed_frames": sum(w.metric("llamavid_frames_recomputed_total") for w in live),
            "ranges": {how: sum(w.metric("llamavid_extraction_ranges_total", how=how) for w in live)
                       for how in ("fresh", "resumed")},
            "frames_encoded_per_live_worker": [w.metric("llamavid_frames_encoded_total") for w in live],
        }
    finally:
        d.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="length of the long video")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extraction-only", action="store_true", help="skip the routing part (a quick rerun)")
    parser.add_argument("--repeats", type=int, default=3, help="extraction runs per worker count")
    parser.add_argument("--range-frames", type=int, default=None, help="LLAMAVID_EXTRACT_RANGE_FRAMES (default: "
                        "the service's)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fleet.json")
    args = parser.parse_args()
    if not shutil.which("ffmpeg") or not shutil.which("taskset"):
        sys.exit("needs ffmpeg and taskset (apt-get install ffmpeg util-linux)")
    os.environ.update(ONE_CORE_EACH)  # inherited by every process started below

    from model.tools.tiny import make_tiny

    with tempfile.TemporaryDirectory(prefix="llamavid-fleet-") as folder:
        tmp = Path(folder)
        checkpoint = make_tiny(tmp / "tiny", "tiny")
        redis = PrivateRedis(free_port(), tmp / "redis.log")
        redis.start()
        try:
            if args.extraction_only:
                routing = {mode: {"repeated_hot_ratio": 0.0, "skipped": True} for mode in ("shared", "affine")}
            else:
                routing = None
            clips = [write_video(tmp / f"clip-{i}.mp4", seconds=6, fps=10, size=(64 + 2 * i, 96)) for i in range(10)]
            if routing is None:
                hot_bytes = int(0.6 * working_set(tmp, checkpoint, redis, clips))
                routing = {mode: routing_run(tmp, checkpoint, redis, clips, mode, args.seed, hot_bytes)
                           for mode in ("shared", "affine")}
            print(json.dumps(routing, indent=2), flush=True)
            video = long_video(tmp / "long.mp4", args.minutes)
            ceilings, runs = [], {1: [], 2: []}
            for _ in range(args.repeats):
                ceilings.append(ffmpeg_ceiling(video, args.minutes))
                for workers in (1, 2):
                    runs[workers].append(extraction_run(tmp, checkpoint, redis, video, workers,
                                                        range_frames=args.range_frames))
            killed = extraction_run(tmp, checkpoint, redis, video, 2, kill_at=0.4, range_frames=args.range_frames)
        finally:
            redis.stop()
    one = statistics.median(r["seconds"] for r in runs[1])
    two = statistics.median(r["seconds"] for r in runs[2])
    result = {
        "routing": routing,
        "routing_goal_met": routing["affine"]["repeated_hot_ratio"] >= 0.9,
        "extraction": {"one_worker_seconds": one, "two_workers_seconds": two,
                       "ratio_two_vs_one": round(two / one, 3),
                       "machine_ceiling_ratio": statistics.median(c["ratio"] for c in ceilings),
                       "runs": runs, "ffmpeg_ceiling": ceilings, "two_workers_owner_killed": killed,
                       "video_minutes": args.minutes},
        "extraction_goal_met": two <= 0.6 * one and killed["recomputed_frames"] == 0,
        "note": "each worker pinned to one core with one thread (it stands for one GPU); tiny random model",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["routing_goal_met"] and result["extraction_goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
