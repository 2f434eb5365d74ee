"""``llamavid train-demo``, ``eval-demo`` and ``demo-clip`` (dispatched here by ``server/cli.py``).

    llamavid train-demo --out model/demo/checkpoint --seed 0 --steps 1600
    llamavid eval-demo --model model/demo/checkpoint --seed 1 --per-type 50 --json out.json
    llamavid demo-clip shapes.mp4 --seed 3 --type binding
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from . import SHIPPED_DIR, TRAINED_DEMO_KIND, TRAINING_RECORD, default_model_dir

if TYPE_CHECKING:
    from ..llama_vid import LlamaVid
    from .evaluate import Answerer


# How evaluation answers: ``server/cli.py`` passes the service's in-process engine (the served
# path); without it (a model-only install), the model's own loop.
AnswererFor = Callable[["LlamaVid"], AbstractContextManager["Answerer"]]


def main(command: str, argv: list[str], *, answerer_for: AnswererFor | None = None) -> int:
    if command == "train-demo":
        return _train(_train_parser().parse_args(argv), argv, answerer_for)
    if command == "eval-demo":
        return _eval(_eval_parser().parse_args(argv), answerer_for)
    if command == "demo-clip":
        return _clip(_clip_parser().parse_args(argv))
    raise SystemExit(f"unknown demo command {command!r} (train-demo, eval-demo or demo-clip)")


def _clip_parser() -> argparse.ArgumentParser:
    from .data import QUESTION_TYPES

    p = argparse.ArgumentParser(prog="llamavid demo-clip",
                                description="write a synthetic shapes clip and print the questions it answers")
    p.add_argument("out", type=Path, help="where to write the .mp4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--type", choices=QUESTION_TYPES, default=None, help="question type (default: any)")
    return p


def _clip(args: argparse.Namespace) -> int:
    import random

    from . import data

    example = data.make_example(args.seed, args.type)
    data.write_clip(example.scene, args.out)
    shapes = ", ".join(f"{s.colour} {s.kind}" for s in example.scene.shapes)
    print(f"wrote {args.out}: {example.scene.num_frames} frames at {data.CLIP_FPS:g} fps, {shapes} ({example.scene.kind})")
    for qa in data.questions(example.scene, random.Random(args.seed)):
        print(f"  {qa.question:<34} -> {qa.answer}  [{qa.qtype}]")
    return 0


def _train_parser() -> argparse.ArgumentParser:
    from .train import TrainConfig

    d = TrainConfig()
    p = argparse.ArgumentParser(prog="llamavid train-demo", description="train the demo model on synthetic shape videos")
    p.add_argument("--out", type=Path, default=SHIPPED_DIR, help=f"checkpoint folder (default {SHIPPED_DIR})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=d.steps, help="stage-3 (LLaMA-VID) optimizer steps")
    p.add_argument("--vision-steps", type=int, default=d.vision_steps, help="stage-1 (vision tower) steps")
    p.add_argument("--qformer-steps", type=int, default=d.qformer_steps, help="stage-2 (Q-Former) steps")
    p.add_argument("--format-steps", type=int, default=d.format_steps, help="stage-4 (answers in JSON) steps")
    p.add_argument("--clips", type=int, default=d.clips, help="pre-rendered training clips")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (determinism holds per count)")
    p.add_argument("--workers", type=int, default=d.workers, help="processes rendering the clips")
    p.add_argument("--minutes", type=float, default=None, help="safety stop (a run it cuts short is not reproducible)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="held-out accuracy every N steps")
    p.add_argument("--eval-per-type", type=int, default=0, help="after training, run eval-demo on N clips per type")
    p.add_argument("--no-progress", action="store_true")
    return p


def _eval_parser() -> argparse.ArgumentParser:
    from .evaluate import ABLATIONS

    p = argparse.ArgumentParser(prog="llamavid eval-demo", description="per-type accuracy and ablations of a demo model")
    p.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the shipped demo)")
    p.add_argument("--seed", type=int, default=1, help="evaluation clip seed (training used other seeds)")
    p.add_argument("--per-type", type=int, default=50, help="clips per question type")
    p.add_argument("--ablations", default=",".join(ABLATIONS), help=f"comma list from {', '.join(ABLATIONS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="write the summary and every answer here")
    p.add_argument("--markdown", type=Path, default=None, help="write the results table here")
    return p


def _answerer(model, answerer_for: AnswererFor | None) -> AbstractContextManager[Answerer]:
    from .evaluate import ModelAnswerer

    return answerer_for(model) if answerer_for is not None else nullcontext(ModelAnswerer(model))


def _train(args: argparse.Namespace, argv: list[str], answerer_for: AnswererFor | None) -> int:
    import torch

    from .train import TrainConfig, train

    cfg = TrainConfig(
        steps=args.steps, vision_steps=args.vision_steps, qformer_steps=args.qformer_steps,
        format_steps=args.format_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, clips=args.clips,
        eval_every=args.eval_every, threads=args.threads, workers=args.workers, max_minutes=args.minutes,
    )
    shipped = _shipped_digests(cfg)  # read first: the recorded command writes over the shipped folder
    started = time.perf_counter()
    cpu0 = time.process_time()
    _, summary = train(cfg, args.out, progress=not args.no_progress)
    record = {
        "kind": TRAINED_DEMO_KIND,
        "command": "llamavid train-demo " + shlex.join(argv),
        "seed": args.seed,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "main_process_cpu_seconds": round(time.process_time() - cpu0, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        **summary,
    }
    if args.eval_per_type:
        from .evaluate import markdown_table, run_eval, summarise

        model = model_from(args.out)
        with _answerer(model, answerer_for) as answerer:
            records = run_eval(model, answerer, seed=1, per_type=args.eval_per_type)
            json_result = _json_eval(answerer, answerer_for, 1, args.eval_per_type)
        record["eval"] = {"seed": 1, "per_type": args.eval_per_type, "summary": summarise(records)}
        record["eval"]["table"] = markdown_table(record["eval"]["summary"], records)
        if json_result is not None:
            record["eval"]["json"] = json_result
    (Path(args.out) / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    _write_training_md(Path(args.out), record)
    print(f"wrote {args.out} in {record['wall_seconds']:.0f}s; held-out accuracy {summary['formats']['held_out']}")
    if shipped:
        print(_reproduction_line(shipped, summary["weights_sha256"]))
    if "eval" in record:
        print(record["eval"]["table"])
        if "json" in record["eval"]:
            print(record["eval"]["json"]["line"])
    return 0


def _json_eval(answerer, answerer_for: AnswererFor | None, seed: int, per_type: int, progress=None) -> dict | None:
    """Binding questions asked in JSON under ``data.JSON_SCHEMA``; only the served path decodes under a
    grammar (the model's own loop has no structured output), so without it there is nothing to report."""
    if answerer_for is None:
        return None
    from .evaluate import json_summary, run_json_eval

    return json_summary(run_json_eval(answerer, seed=seed, per_type=per_type, progress=progress))


def _shipped_digests(cfg) -> dict[str, str] | None:
    """The shipped checkpoint's weight digests per stage, if it was trained with this very config."""
    from .train import config_dict

    path = SHIPPED_DIR / TRAINING_RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record.get("weights_sha256") if record.get("config") == config_dict(cfg) else None


def _reproduction_line(shipped: dict[str, str], ours: dict[str, str]) -> str:
    differ = [stage for stage, digest in ours.items() if shipped.get(stage) != digest]
    if not differ:
        return f"same config as the shipped checkpoint: weights identical bit for bit (sha256 {ours['final'][:16]})"
    return f"same config as the shipped checkpoint, but the weights differ from {differ[0]} on"


def model_from(folder: Path):
    from ..loader import load_llamavid

    return load_llamavid(folder, device="cpu")


def _write_training_md(out: Path, record: dict) -> None:
    cfg = record["config"]
    lines = [
        "# How this checkpoint was made",
        "",
        "```bash",
        record["command"],
        "```",
        "",
        (f"- seed {record['seed']}, {record['steps_done']} steps of batch {cfg['batch_size']}, "
         f"{cfg['clips']} pre-rendered training clips, torch {record['torch']}, {record['machine']}"),
        f"- wall time {record['wall_seconds'] / 60:.1f} min; seconds per stage: "
        + ", ".join(f"{k} {v:.0f}" for k, v in record["seconds"].items()),
        f"- stage 3 final loss {record['final_loss']}, held-out exact match {record['held_out']}",
        "- the full record (config, learning curve) is in `training.json`",
    ]
    if "formats" in record:
        stage4 = record["formats"]
        lines.insert(-1, f"- stage 4 (binding questions answered in JSON, half of each batch): {stage4['steps_done']} steps, "
                         f"final loss {stage4['final_loss']}, held-out exact match {stage4['held_out']}")
    if "weights_sha256" in record:
        digests = ", ".join(f"{stage} `{digest[:16]}`" for stage, digest in record["weights_sha256"].items())
        lines.append(f"- weights SHA-256 after each stage: {digests}; rerunning the command (any `--out`) prints "
                     "whether the rerun's weights match these bit for bit")
    for rerun in record.get("reruns", []):
        lines.append(f"- rerun ({rerun['when']}, {rerun['wall_seconds'] / 60:.1f} min): {rerun['result']}")
    if "eval" in record:
        lines += ["", "## Evaluation (`llamavid eval-demo`)", "", record["eval"]["table"]]
        if "json" in record["eval"]:
            lines += ["", record["eval"]["json"]["line"]]
    (out / "TRAINING.md").write_text("\n".join(lines) + "\n")


def _eval(args: argparse.Namespace, answerer_for: AnswererFor | None) -> int:
    import torch
    from tqdm import tqdm

    from .evaluate import markdown_table, run_eval, summarise

    torch.set_num_threads(args.threads)
    folder = args.model or default_model_dir()
    model = model_from(Path(folder))
    names = [n.strip() for n in args.ablations.split(",") if n.strip()]
    with _answerer(model, answerer_for) as answerer, tqdm(desc="eval-demo", unit="question", file=sys.stderr) as bar:
        records = run_eval(model, answerer, seed=args.seed, per_type=args.per_type, ablations=names,
                           progress=lambda n: bar.update(n - bar.n))
        done = bar.n
        json_result = _json_eval(answerer, answerer_for, args.seed, args.per_type,
                                 progress=lambda n: bar.update(done + n - bar.n))
    summary = summarise(records)
    table = markdown_table(summary, records)
    if json_result is not None:
        table += "\n\n" + json_result["line"]
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": str(folder), "path": "served" if answerer_for else "model", "seed": args.seed,
            "per_type": args.per_type, "summary": summary, "table": table, "json": json_result,
            "records": [r.__dict__ for r in records],
        }, indent=2) + "\n")
    return 0
