"""Ingest benchmark: sampling, decoding and preprocessing a long video, and pipelined extraction.

Measured in one run on a 10-minute 720p 30 fps H.264 file made here with ffmpeg (lavfi testsrc,
x264 ``veryfast``; a 60 s segment is encoded once and looped by stream copy to the full length,
so the bench does not spend minutes encoding; the decoders still see an ordinary 10-minute stream,
with x264's default 250-frame GOPs and B-frames):

(a) frames/s of 1 fps sampling + decoding + CLIP preprocessing (224 px, the real processor)
    through ``model.pipeline.iter_video_pixels`` (PyAV decoding in one thread, preprocessing in
    another), against ``ffmpeg -i FILE -vf fps=1 -f null -`` on the same file (decoding and
    sampling only: no RGB conversion, no preprocessing). Goal: >= 0.8x ffmpeg. For reference, the
    previous path (decord ``get_batch`` then preprocessing, one thread), and both decoders
    without preprocessing (``VideoFile.iter_frames`` against decord ``get_batch``).
(b) end-to-end feature extraction with a small random EVA (``make_tiny(..., "small")``):
    ``iter_video_features`` (pipelined) against the same stages run one after another in one
    thread (the previous loop); the features are checked bit for bit equal.

Variants run interleaved, round after round, so load from other processes hits them alike;
medians are reported with the CPU seconds each variant used. torch runs one thread in (b), so the
encoder stands in for a GPU and leaves the other core to decoding and preprocessing.

    python bench/ingest.py [--minutes 10 --rounds 3]   -> bench/results/ingest.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)

import av  # noqa: E402
import decord  # noqa: E402
import torch  # noqa: E402

from model.loader import load_llamavid  # noqa: E402
from model.pipeline import FEATURE_DTYPE, iter_video_features, iter_video_pixels  # noqa: E402
from model.preprocess import ClipPreprocessor  # noqa: E402
from model.tools.tiny import make_tiny  # noqa: E402
from model.video import FrameSampling, VideoFile, VideoInfo, sample_indices  # noqa: E402

CHUNK = 32
SAMPLING = FrameSampling(fps=1.0)


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def make_video(folder: Path, minutes: float, segment: float = 60.0) -> Path:
    seg, out = folder / "segment.mp4", folder / "long720.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc=duration={segment}:size=1280x720:rate=30",
                    "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", str(seg)], check=True)
    loops = max(0, int(round(minutes * 60 / segment)) - 1)
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-stream_loop", str(loops), "-i", str(seg), "-c", "copy", str(out)],
                   check=True)
    return out


# -- (a) decode + sample + preprocess ---------------------------------------------------------------


def run_ffmpeg(path: Path) -> tuple[int, float]:
    """``ffmpeg -vf fps=1 -f null -``; returns (frames out, CPU seconds of the child)."""
    before = cpu_seconds(resource.RUSAGE_CHILDREN)
    done = subprocess.run(["ffmpeg", "-hide_banner", "-nostats", "-i", str(path), "-vf", "fps=1", "-f", "null", "-"],
                          check=True, capture_output=True, text=True)
    frames = [line for line in done.stderr.splitlines() if line.startswith("frame=")]
    count = int(frames[-1].split("=")[1].split()[0]) if frames else 0
    return count, cpu_seconds(resource.RUSAGE_CHILDREN) - before


def run_ours(path: Path, preprocess: ClipPreprocessor | None) -> tuple[int, float]:
    """``VideoFile`` + ``iter_video_pixels`` (decoding and preprocessing threads), or decoding alone."""
    before = cpu_seconds()
    with VideoFile(path) as video:
        indices = sample_indices(video.info, SAMPLING)
        if preprocess is None:
            frames = sum(len(part) for part in video.iter_frames(indices, chunk=CHUNK))
        else:
            frames = sum(len(part.indices) for part in iter_video_pixels(preprocess, video, indices, chunk=CHUNK))
    return frames, cpu_seconds() - before


def run_decord(path: Path, preprocess: ClipPreprocessor | None) -> tuple[int, float]:
    """The previous path: decord's index and ``get_batch`` (one thread), then preprocessing, if any."""
    before = cpu_seconds()
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    indices = sample_indices(VideoInfo(len(reader), reader.get_avg_fps(), 1, 1), SAMPLING)
    frames = 0
    for start in range(0, len(indices), CHUNK):
        batch = reader.get_batch(indices[start : start + CHUNK]).asnumpy()
        frames += len(batch if preprocess is None else preprocess(batch))
    return frames, cpu_seconds() - before


def interleaved(variants: dict[str, Callable[[], tuple[int, float]]], rounds: int) -> dict[str, dict]:
    runs: dict[str, list[tuple[float, int, float]]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            frames, cpu = fn()
            runs[name].append((time.perf_counter() - t0, frames, cpu))
    out = {}
    for name, rows in runs.items():
        wall = statistics.median(r[0] for r in rows)
        out[name] = {
            "frames": rows[0][1],
            "wall_s": [round(r[0], 3) for r in rows],
            "median_wall_s": round(wall, 3),
            "median_cpu_s": round(statistics.median(r[2] for r in rows), 3),
            "frames_per_s": round(rows[0][1] / wall, 2),
        }
    return out


# -- (b) end-to-end extraction ----------------------------------------------------------------------


def sequential_features(model, video: VideoFile, indices: list[int]) -> list[torch.Tensor]:
    """The previous loop: decode, preprocess and encode each chunk in turn, in one thread."""
    out = []
    for frames in video.iter_frames(indices, chunk=CHUNK):
        out.append(model.encode_frames(model.preprocess(frames), batch_size=CHUNK).to("cpu", FEATURE_DTYPE))
    return out


def extraction(path: Path, model, rounds: int) -> dict:
    results: dict[str, list] = {"sequential": [], "pipelined": []}
    features: dict[str, torch.Tensor] = {}
    stages: dict[str, float] = {}
    for _ in range(rounds):
        for name in results:
            before, t0 = cpu_seconds(), time.perf_counter()
            with VideoFile(path) as video:
                indices = sample_indices(video.info, SAMPLING)
                if name == "sequential":
                    parts = sequential_features(model, video, indices)
                else:
                    chunks = list(iter_video_features(model, video, indices, chunk=CHUNK))
                    parts = [c.features for c in chunks]
                    stages = {key: round(sum(getattr(c, f"{key}_seconds") for c in chunks), 3)
                              for key in ("decode", "preprocess", "encode", "wait")}
            results[name].append((time.perf_counter() - t0, cpu_seconds() - before))
            features[name] = torch.cat(parts)
    out = {name: {"frames": len(features[name]), "wall_s": [round(r[0], 3) for r in rows],
                  "median_wall_s": round(statistics.median(r[0] for r in rows), 3),
                  "median_cpu_s": round(statistics.median(r[1] for r in rows), 3)}
           for name, rows in results.items()}
    out["pipelined"]["stage_seconds_last_round"] = stages
    out["speedup_pipelined_vs_sequential"] = round(out["sequential"]["median_wall_s"] / out["pipelined"]["median_wall_s"], 3)
    out["features_bit_identical"] = bool(torch.equal(features["sequential"], features["pipelined"]))
    return out


def ffmpeg_version() -> str:
    return subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.splitlines()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds for (a); (b) runs max(1, rounds - 1)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ingest.json")
    args = parser.parse_args()
    if shutil.which("ffmpeg") is None:
        sys.exit("bench/ingest.py makes its video with, and measures against, the ffmpeg command: "
                 "install it first (Debian: apt-get install ffmpeg)")

    started = time.perf_counter()
    result: dict = {
        "benchmark": "ingest",
        "setup": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                  "torch": torch.__version__, "av": av.__version__, "ffmpeg_in_av": av.library_versions["libavcodec"],
                  "decord": decord.__version__, "ffmpeg_cli": ffmpeg_version(), "chunk": CHUNK,
                  "sampling": SAMPLING.as_dict()},
        "load_average_start": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="llamavid-ingest-bench-") as tmp:
        t0 = time.perf_counter()
        path = make_video(Path(tmp), args.minutes)
        with VideoFile(path) as video:
            info = video.info
        result["video"] = {"seconds_to_make": round(time.perf_counter() - t0, 1), "bytes": path.stat().st_size,
                           "num_frames": info.num_frames, "avg_fps": info.avg_fps, "duration_s": round(info.duration, 2),
                           "size": [info.width, info.height], "codec": "h264 (libx264 veryfast, yuv420p)"}
        print(f"video: {info.num_frames} frames, {info.duration:.0f} s, {path.stat().st_size / 1e6:.1f} MB", flush=True)

        clip = ClipPreprocessor()
        decode = interleaved({"ffmpeg_fps1_null": lambda: run_ffmpeg(path),
                              "ours_decode_sample_preprocess": lambda: run_ours(path, clip),
                              "previous_decord_then_preprocess": lambda: run_decord(path, clip),
                              "ours_decode_sample_only": lambda: run_ours(path, None),
                              "previous_decord_decode_sample_only": lambda: run_decord(path, None)}, args.rounds)

        def ratio(a: str, b: str) -> float:
            return round(decode[a]["frames_per_s"] / decode[b]["frames_per_s"], 3)

        decode["ratio_ours_vs_ffmpeg"] = ratio("ours_decode_sample_preprocess", "ffmpeg_fps1_null")
        decode["goal"] = 0.8
        decode["goal_met"] = decode["ratio_ours_vs_ffmpeg"] >= 0.8
        decode["ratio_previous_vs_ffmpeg"] = ratio("previous_decord_then_preprocess", "ffmpeg_fps1_null")
        decode["ratio_decode_only_ours_vs_ffmpeg"] = ratio("ours_decode_sample_only", "ffmpeg_fps1_null")
        decode["ratio_decode_only_ours_vs_decord"] = ratio("ours_decode_sample_only", "previous_decord_decode_sample_only")
        result["a_decode_sample_preprocess"] = decode
        print(json.dumps(decode, indent=1), flush=True)

        previous_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            model = load_llamavid(make_tiny(Path(tmp) / "small", "small"), device="cpu")
            extract = extraction(path, model, max(1, args.rounds - 1))
        finally:
            torch.set_num_threads(previous_threads)
        extract["model"] = {"preset": "small", "eva_image_size": model.vision.config.image_size,
                            "torch_threads": 1}
        result["b_extraction"] = extract
        print(json.dumps(extract, indent=1), flush=True)

    result["load_average_end"] = os.getloadavg()
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} in {result['total_seconds']} s")


if __name__ == "__main__":
    main()
