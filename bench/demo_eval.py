"""Demo-model evaluation: accuracy per question type and the token ablations, through the served path.

Every clip is a fresh seeded H.264 file (seeds disjoint from training), answered through the
service's in-process engine (``server.worker.offline``): the same media store, extraction loop,
feature cache, runner and batched decoder as ``llamavid serve``; see ``model/demo/evaluate.py``
for the ablations. The binding questions are asked once more "in JSON" under a JSON schema
(structured output: how many answers parse, how many give the right values). One more condition answers from features read back from int8 cache blobs
(``cache/serialize.py``), and the fp16 and int8 blobs' error on the tokens is measured against
fp32 features.

    python bench/demo_eval.py [--model model/demo/checkpoint --seed 1 --per-type 100]
        -> bench/results/demo_eval.json (summary, markdown table, every answer)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from cache import MemoryFeatureStore
from cache.serialize import decode, encode
from model.demo import data, default_model_dir, is_trained_demo
from model.demo.evaluate import (
    ABLATIONS,
    binding_chance,
    eval_clips,
    json_summary,
    markdown_table,
    run_eval,
    run_json_eval,
    summarise,
    time_breakdown,
)
from model.loader import load_llamavid
from model.video import FrameSampling, load_video
from server.worker.offline import OfflineEngine


def through_cache(fmt: str):
    """Features as a worker reads them back from a store that writes ``fmt`` blobs, one per frame."""
    def round_trip(features: torch.Tensor) -> torch.Tensor:
        return torch.stack([decode(encode(frame, fmt)) for frame in features]).to(features.dtype)
    return round_trip


class BlobStore(MemoryFeatureStore):
    """What a worker reads back from a Redis feature store writing ``fmt`` blobs (no Redis needed)."""

    def __init__(self, fmt: str) -> None:
        super().__init__(4 << 30)
        self.round_trip = through_cache(fmt)

    async def put_frames(self, encoder_id, video_digest, frame_indices, features) -> int:
        return await super().put_frames(encoder_id, video_digest, frame_indices, self.round_trip(features))


def token_error(model, seed: int, clips: int, fmt: str) -> dict[str, float]:
    """Relative error of the two tokens per frame built from ``fmt`` blobs against fp32 features."""
    errors: dict[str, list[float]] = {"context": [], "content": [], "features": []}
    with tempfile.TemporaryDirectory() as tmp:
        for clip_seed, qtype in eval_clips(seed, clips)[:clips]:
            example = data.make_example(clip_seed, qtype)
            path = data.write_clip(example.scene, Path(tmp) / "clip.mp4")
            frames, _ = load_video(path, FrameSampling(fps=data.CLIP_FPS))
            features = model.encode_frames(model.preprocess(frames)).float()  # unlike the pipeline's float16
            stored = through_cache(fmt)(features)
            ref = model.frame_tokens(features, example.qa.question).tokens.float()
            got = model.frame_tokens(stored, example.qa.question).tokens.float()
            for name, (a, b) in {"context": (got[0::2], ref[0::2]), "content": (got[1::2], ref[1::2]),
                                 "features": (stored.float(), features.float())}.items():
                errors[name].append(((a - b).norm() / b.norm()).item())
    return {name: round(max(v), 5) for name, v in errors.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--per-type", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "demo_eval.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    folder = args.model or default_model_dir()
    if not is_trained_demo(folder):
        print(f"warning: {folder} is not a trained demo checkpoint; expect chance-level answers", file=sys.stderr)
    model = load_llamavid(folder, device="cpu")
    started = time.perf_counter()
    with OfflineEngine(model, fps=data.CLIP_FPS) as served, \
            OfflineEngine(model, fps=data.CLIP_FPS, store=BlobStore("int8")) as int8:
        variants = {"int8_cache": int8}
        records = run_eval(model, served, seed=args.seed, per_type=args.per_type, ablations=list(ABLATIONS),
                           variants=variants)
        json_records = run_json_eval(served, seed=args.seed, per_type=args.per_type)
    json_result = json_summary(json_records)
    seconds = time.perf_counter() - started
    summary = summarise(records)
    table = markdown_table(summary, records)
    by_time_kind = time_breakdown(records)
    print(table)
    print(json_result["line"])
    print("time questions, both tokens:", ", ".join(f"{k} {v['right']}/{v['asked']}" for k, v in by_time_kind.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": str(folder),
        "path": "served: server.worker.offline.OfflineEngine (the in-process engine of llamavid serve)",
        "seed": args.seed,
        "clips_per_type": args.per_type,
        "questions": len(records),
        "seconds": round(seconds, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "binding_chance_among_shapes_in_view": round(binding_chance(records), 4),
        "time_questions_full": by_time_kind,
        "max_relative_error_vs_fp32": {fmt: token_error(model, args.seed, 20, fmt) for fmt in ("float16", "int8")},
        "summary": {k: {t: round(v, 4) for t, v in row.items()} for k, row in summary.items()},
        "table": table,
        "json_answers": json_result,
        "records": [r.__dict__ for r in records],
        "json_records": [r.__dict__ for r in json_records],
    }, indent=2) + "\n")
    print(f"{len(records)} questions x {len(ABLATIONS) + len(variants)} conditions in {seconds:.0f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
