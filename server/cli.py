"""The ``llamavid`` command line: serve, api, worker, batch, ask, prompt, plan, parity, make-tiny, train-demo, eval-demo, demo-clip.

Each subcommand imports what it needs when it runs, so ``llamavid parity`` works without the
server extras installed and ``llamavid --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DEMO_COMMANDS = ("train-demo", "eval-demo", "demo-clip")  # parse their own flags (model/demo/cli.py)
SERVER_COMMANDS = ("serve", "api", "worker", "batch")
SERVER_EXTRA = "pip install 'llamavid-serve[server]'"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SERVER_COMMANDS and (missing := _missing_server_extra()):
        print(f"llamavid {argv[0]} needs the server extra ({missing} is not installed): {SERVER_EXTRA}",
              file=sys.stderr)
        return 2
    if argv and argv[0] in DEMO_COMMANDS:
        from model.demo.cli import main as demo_main

        # Evaluation answers through the service's in-process engine when the server is installed.
        served = None if _missing_server_extra() else _offline_engine
        return demo_main(argv[0], argv[1:], answerer_for=served)
    parser = argparse.ArgumentParser(prog="llamavid", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    for name, help_text in (
        ("serve", "run the whole service in one process (in-process queue and feature cache)"),
        ("api", "run the HTTP front end of a split deployment (needs REDIS_URL)"),
        ("worker", "run a GPU worker of a split deployment (needs REDIS_URL)"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text + ". Every flag also reads LLAMAVID_<FLAG>.")
        _add_settings_flags(p)
        p.add_argument("--log-level", default="info")

    batch = sub.add_parser(
        "batch", help="answer a Batch API input file (JSONL of /v1/chat/completions requests) without a server",
        description="Answer every line of an OpenAI Batch API input file with the model in this process, grouped "
                    "by video (each decoded and encoded once), as the server's /v1/batches would: OUTPUT gets the "
                    "answered lines in input order, the errors file the failed ones. A video_url or image_url may "
                    "also be a local path (relative to INPUT's folder) or a file:// URL. Every flag also reads "
                    "LLAMAVID_<FLAG>.")
    batch.add_argument("input", type=Path, help="JSONL: {custom_id, method: POST, url: /v1/chat/completions, body}")
    batch.add_argument("output", type=Path, help="JSONL of the answers, in input order")
    batch.add_argument("--errors", type=Path, default=None, metavar="PATH",
                       help="JSONL of the failed lines (default: OUTPUT's name with .errors before its suffix)")
    _add_settings_flags(batch)
    batch.add_argument("--log-level", default="warning")

    ask = sub.add_parser("ask", help="answer a question about a video or image, streaming to stdout")
    ask.add_argument("media", help="video or image file")
    ask.add_argument("question")
    ask.add_argument("--model", help="checkpoint folder or hub id (default: the bundled demo model)")
    ask.add_argument("--device", default=None)
    ask.add_argument("--fps", type=float, default=1.0)
    ask.add_argument("--max-frames", type=int, default=None)
    ask.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    ask.add_argument("--top-p", type=float, default=None)
    ask.add_argument("--max-new-tokens", type=int, default=512)
    ask.add_argument("--template", default="vicuna_v1")
    ask.add_argument("--quantization", choices=["none", "4bit", "8bit"], default="none")

    prompt = sub.add_parser(
        "prompt", help="print the exact text prompt the model gets for a video (visual tokens as <image>)",
        description="Print the exact text prompt a checkpoint's LLM receives for a question about a video, each "
                    "visual token written as <image>. Reads config.json, the processor and the video's frame "
                    "times only: no weights, no model run.")
    prompt.add_argument("video", help="video file")
    prompt.add_argument("question")
    prompt.add_argument("--model", help="checkpoint folder or hub id (default: the bundled demo model)")
    prompt.add_argument("--subtitles", default=None, metavar="FILE|auto|none",
                        help="an SRT or WebVTT file; 'auto': the video's own text subtitle track; 'none'. Default, as "
                             "the service: 'auto' for a long-video checkpoint, 'none' for the others")
    prompt.add_argument("--fps", type=float, default=1.0)
    prompt.add_argument("--max-frames", type=int, default=None)
    prompt.add_argument("--template", default="vicuna_v1")

    plan = sub.add_parser("plan", help="how a checkpoint fits a GPU: weights, activation reserve, KV cache (JSON)",
                          description="Work out the memory plan from config.json alone (no weights are read).")
    plan.add_argument("--model", help="checkpoint folder or hub id (default: the bundled demo model)")
    plan.add_argument("--gpu-memory", required=True, help="device memory, e.g. 24GiB, 80GB (read as GiB)")
    plan.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    plan.add_argument("--quantization", default="none", choices=["none", "4bit", "8bit"])
    plan.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    plan.add_argument("--kv-cache-bytes", default=None, help="KV cache size, overriding the plan (e.g. 4GiB)")
    plan.add_argument("--max-tokens-limit", type=int, default=2048, help="the largest max_tokens a request may ask")
    plan.add_argument("--max-running", type=int, default=8)
    plan.add_argument("--vision-tower", default=None, help="eva_vit_g.pth (its tensor shapes are read)")
    plan.add_argument("--text", action="store_true", help="a table instead of JSON")

    parity = sub.add_parser("parity", help="compare against a reference case (../shared/parity/<case>)")
    parity.add_argument("--case", required=True, type=Path)

    tiny = sub.add_parser("make-tiny", help="write a random-weight checkpoint in the official layout")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--preset", default="tiny", choices=["tiny", "small", "7b"])
    tiny.add_argument("--format", default="bin", choices=["bin", "safetensors"])
    tiny.add_argument("--shards", type=int, default=2)
    tiny.add_argument("--compress", default="mean", help="mean, grid:N or none")
    tiny.add_argument("--image-size", type=int, default=None)
    tiny.add_argument("--seed", type=int, default=0)

    for name, help_text in (
        ("train-demo", "train the shipped demo model on synthetic videos"),
        ("eval-demo", "evaluate a demo model per question type, with ablations"),
        ("demo-clip", "write a synthetic shapes clip the demo model answers questions about"),
    ):
        sub.add_parser(name, help=help_text + f" (see llamavid {name} --help)")

    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "info").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = {
        "serve": _run_server,
        "api": _run_server,
        "worker": _run_server,
        "batch": _batch,
        "ask": _ask,
        "prompt": _prompt,
        "plan": _plan,
        "parity": _parity,
        "make-tiny": _make_tiny,
    }[args.command]
    return handler(args)


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field of ``server.settings.Settings``, documented from the field itself."""
    try:
        from pydantic_core import PydanticUndefined

        from .settings import Settings
    except ImportError:  # the server extra is not installed: ``main`` says so before parsing
        return
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True) if field.default is not PydanticUndefined or \
            field.default_factory else None
        env = "REDIS_URL or LLAMAVID_REDIS_URL" if name == "redis_url" else f"LLAMAVID_{name.upper()}"
        shown = ",".join(default) if isinstance(default, list) else default
        text = f"{field.description + '. ' if field.description else ''}[env {env}; default: {shown}]"
        parser.add_argument("--" + name.replace("_", "-"), dest=name, metavar="VALUE", help=text.replace("%", "%%"))


def _offline_engine(model):
    from model.demo.data import CLIP_FPS

    from .worker.offline import OfflineEngine

    return OfflineEngine(model, fps=CLIP_FPS)


def _missing_server_extra() -> str | None:
    """The first package of the server extra that cannot be imported, if any."""
    import importlib.util

    for module in ("fastapi", "uvicorn", "pydantic_settings", "sse_starlette", "redis", "prometheus_client", "httpx"):
        if importlib.util.find_spec(module) is None:
            return module
    return None


def _run_server(args: argparse.Namespace) -> int:
    from .launch import run
    from .settings import Settings

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "log_level") and v is not None}
    settings = Settings(**overrides)
    return run(args.command, settings, log_level=args.log_level)


def _batch(args: argparse.Namespace) -> int:
    import asyncio

    from .offline_batch import errors_path_for, run_batch
    from .settings import Settings

    skip = ("command", "log_level", "input", "output", "errors")
    settings = Settings(**{k: v for k, v in vars(args).items() if k not in skip and v is not None})
    errors = args.errors or errors_path_for(args.output)
    return asyncio.run(run_batch(settings, args.input, args.output, errors))


def _ask(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from model.conversation import Message
    from model.demo import default_model_dir
    from model.image import decode_image, looks_like_image
    from model.llama_vid import VisualInput
    from model.loader import load_llamavid
    from model.pipeline import encode_image, encode_video, plan_video
    from model.video import FrameSampling

    model_dir = args.model or default_model_dir()
    model = load_llamavid(model_dir, device=args.device or _auto_device(), quantization=args.quantization)
    data = Path(args.media).read_bytes()
    if looks_like_image(data):
        visual = VisualInput(encode_image(model, decode_image(data)), "image")
    else:
        video, indices = plan_video(data, FrameSampling(args.fps, args.max_frames))
        with tqdm(total=len(indices), unit="frame", desc="encoding", file=sys.stderr) as bar:
            encoded = encode_video(model, video, indices, progress=lambda done, total: bar.update(done - bar.n))
        if encoded.skipped:
            print(f"llamavid ask: {len(encoded.skipped)} of {len(indices)} sampled frames do not decode and were "
                  "left out", file=sys.stderr)
        visual = VisualInput(encoded.features, "video")
    prepared = model.prepare([Message("user", args.question)], visual, template=args.template)
    params = model.params(prepared, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    for delta in model.stream(prepared, params):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _prompt(args: argparse.Namespace) -> int:
    from model.config import LlamaVidConfig
    from model.conversation import Message
    from model.demo import default_model_dir
    from model.llama_vid import checkpoint_num_patches, checkpoint_prompt_text
    from model.loader import resolve_model_dir
    from model.subtitles import container_subtitles, frame_texts, load_subtitles
    from model.video import FrameSampling, VideoFile, sample_indices

    try:
        config = LlamaVidConfig.from_dir(resolve_model_dir(args.model or default_model_dir()))
        video = VideoFile(args.video)
        indices = sample_indices(video.info, FrameSampling(args.fps, args.max_frames))
        choice = args.subtitles or ("auto" if config.long_video else "none")
        cues = (None if choice == "none" else container_subtitles(args.video) if choice == "auto"
                else load_subtitles(Path(choice)))
        texts = None if cues is None else frame_texts(cues, video.timestamps(indices))
        text = checkpoint_prompt_text(config, checkpoint_num_patches(config), [Message("user", args.question)],
                                      len(indices), subtitles=texts, template=args.template)
    except (OSError, ValueError) as exc:  # a missing file, a bad video, subtitle file or checkpoint
        print(f"llamavid prompt: {exc}", file=sys.stderr)
        return 2
    print(text)
    return 0


def _plan(args: argparse.Namespace) -> int:
    import torch

    from model.config import LlamaVidConfig
    from model.demo import default_model_dir
    from model.loader import resolve_model_dir
    from model.memory import parse_bytes, plan_memory

    config = LlamaVidConfig.from_dir(resolve_model_dir(args.model or default_model_dir()), vision_tower=args.vision_tower)
    plan = plan_memory(
        config, device_bytes=parse_bytes(args.gpu_memory), utilization=args.gpu_memory_utilization,
        dtype=getattr(torch, args.dtype), quantization=args.quantization,
        kv_cache_bytes=parse_bytes(args.kv_cache_bytes) if args.kv_cache_bytes else None,
        max_running=args.max_running, max_new_tokens=args.max_tokens_limit,
    )
    print(plan.table() if args.text else json.dumps(plan.as_dict(), indent=2))
    return 0 if plan.fits else 1


def _parity(args: argparse.Namespace) -> int:
    from model.tools.parity import run_case

    report = run_case(args.case)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


def _make_tiny(args: argparse.Namespace) -> int:
    from model.tools.tiny import make_tiny

    compress = None if args.compress in ("none", "None", "") else args.compress
    out = make_tiny(args.out, args.preset, fmt=args.format, num_shards=args.shards, seed=args.seed,
                    compress=compress, image_size=args.image_size)
    print(f"wrote a random {args.preset} LLaMA-VID checkpoint to {out}")
    return 0


def _auto_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(main())
