"""Evaluate a demo model per question type, with ablations.

Every clip is written as an H.264 file and handed to an ``Answerer``, which reads it and answers
greedily. ``llamavid eval-demo`` and ``bench/demo_eval.py`` pass the service's in-process engine
(``server.worker.offline``: the same extraction loop, feature cache, runner and batched decoder
as ``llamavid serve``), so the published accuracy is the served path; ``ModelAnswerer`` is the
model's own loop (``encode_video``, ``prepare``, ``stream``: what ``llamavid ask`` runs), for
installs without the server. Ablations are applied to the model from outside its code:

* ``no_context`` / ``no_content``: a forward hook on the visual head sets that token of every
  frame to the zero vector before it is spliced into the LLM's input;
* ``qformer_blank``: the Q-Former reads an empty question (its tokenizer is wrapped), while the
  LLM's prompt still holds the question; the context token no longer knows what is asked;
* ``prompt_blank``: the LLM's prompt holds an empty question while the Q-Former still reads it;
  the answer must then come from what the context token carries;
* ``both_blank``: neither sees the question.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..conversation import Message
from ..llama_vid import LlamaVid, PreparedPrompt, VisualInput
from ..pipeline import encode_video, plan_video
from ..qformer import QFormerText
from ..video import FrameSampling
from . import data

EVAL_SEED_BASE = 2_000_000_000  # clip seeds for evaluation: disjoint from every training seed


@dataclass(frozen=True)
class Ablation:
    name: str
    zero_context: bool = False
    zero_content: bool = False
    qformer_sees_question: bool = True
    prompt_has_question: bool = True
    description: str = ""


ABLATIONS: dict[str, Ablation] = {
    a.name: a
    for a in (
        Ablation("full", description="both tokens, question everywhere"),
        Ablation("no_context", zero_context=True, description="context token zeroed"),
        Ablation("no_content", zero_content=True, description="content token zeroed"),
        Ablation("qformer_blank", qformer_sees_question=False, description="Q-Former reads an empty question"),
        Ablation("prompt_blank", prompt_has_question=False, description="LLM prompt has an empty question"),
        Ablation("both_blank", qformer_sees_question=False, prompt_has_question=False,
                 description="no question anywhere"),
    )
}

VARIANT_LABELS = {  # conditions ``bench/demo_eval.py`` adds through ``variants``
    "int8_cache": "features read back from int8 cache blobs",
}


class _FixedQuestion:
    """Stands in for the Q-Former tokenizer: tokenizes ``text`` whatever it is asked."""

    def __init__(self, inner, text: str) -> None:
        self.inner, self.text = inner, text

    def __len__(self) -> int:
        return len(self.inner)

    def __call__(self, prompts: list[str]) -> QFormerText:
        return self.inner([self.text] * len(prompts))


@contextmanager
def ablated(model: LlamaVid, ablation: Ablation, question: str) -> Iterator[None]:
    """Apply ``ablation`` to ``model`` for one question; the model is restored on exit."""
    handle = None
    if ablation.zero_context or ablation.zero_content:
        def zero_tokens(_module, _inputs, output):
            tokens = output.tokens.clone()
            if ablation.zero_context:
                tokens[:, 0] = 0
            if ablation.zero_content:
                tokens[:, 1:] = 0
            return output._replace(tokens=tokens)

        handle = model.visual.register_forward_hook(zero_tokens)
    original = model.qformer_tokenizer
    # prepare() hands the Q-Former the prompt's question: pin the text the Q-Former really reads.
    model.qformer_tokenizer = _FixedQuestion(original, question if ablation.qformer_sees_question else "")
    try:
        yield
    finally:
        model.qformer_tokenizer = original
        if handle is not None:
            handle.remove()


def normalise(text: str) -> str:
    return re.sub(r"[^a-z ]", "", text.lower()).strip()


def prepare(model: LlamaVid, features: torch.Tensor, question: str, ablation: Ablation = ABLATIONS["full"]) -> PreparedPrompt:
    """``LlamaVid.prepare`` for one question under ``ablation``."""
    with ablated(model, ablation, question):
        prompt_text = question if ablation.prompt_has_question else ""
        return model.prepare([Message("user", prompt_text)], VisualInput(features, "video"))


def encode_file(model: LlamaVid, path: str | Path, fps: float = data.CLIP_FPS) -> torch.Tensor:
    """The media path: decord plan + decode, CLIP preprocessing, EVA, features as the cache stores them."""
    video, indices = plan_video(str(path), FrameSampling(fps=fps))
    return encode_video(model, video, indices).features


class Answerer(Protocol):
    """How an evaluation reads a clip and answers one question about it (greedy, a few tokens)."""

    def read(self, path: Path) -> object: ...
    def answer(self, clip: object, question: str) -> str: ...


class StructuredAnswerer(Answerer, Protocol):
    """An answerer that can also decode under a JSON schema (the served path: the batched decoder)."""

    def answer(self, clip: object, question: str, *, max_tokens: int = 8, schema: dict | None = None) -> str: ...


class ModelAnswerer:
    """The model's own loop: ``encode_video``, ``prepare`` and ``stream``, as ``llamavid ask`` runs it."""

    def __init__(self, model: LlamaVid, *, max_new_tokens: int = 8) -> None:
        self.model, self.max_new_tokens = model, max_new_tokens

    def read(self, path: Path) -> torch.Tensor:
        return encode_file(self.model, path)

    def answer(self, clip: torch.Tensor, question: str) -> str:
        prepared = self.model.prepare([Message("user", question)], VisualInput(clip, "video"))
        params = self.model.params(prepared, temperature=0.0, max_new_tokens=self.max_new_tokens)
        return "".join(delta.text for delta in self.model.stream(prepared, params))


@dataclass
class Record:
    seed: int
    qtype: str
    question: str
    expected: str
    num_shapes: int
    answers: dict[str, str]  # ablation -> model answer


def eval_clips(seed: int, per_type: int) -> list[tuple[int, str]]:
    """(clip seed, question type) pairs: ``per_type`` fresh clips for every type."""
    base = EVAL_SEED_BASE + seed * 1_000_000
    return [(base + i * len(data.QUESTION_TYPES) + j, t) for i in range(per_type) for j, t in enumerate(data.QUESTION_TYPES)]


def run_eval(
    model: LlamaVid,
    answerer: Answerer | None = None,
    *,
    seed: int = 1,
    per_type: int = 50,
    ablations: list[str] | None = None,
    variants: dict[str, Answerer] | None = None,
    progress=None,
) -> list[Record]:
    """Every question of the clip's type, on ``per_type`` clips per type, under each ablation of
    ``model`` (which ``answerer`` must answer with). ``variants`` adds conditions answered by
    other answerers with both tokens (e.g. features read back from int8 cache blobs)."""
    answerer = answerer or ModelAnswerer(model)
    names = ablations or list(ABLATIONS)
    variants = variants or {}
    records: list[Record] = []
    with tempfile.TemporaryDirectory() as tmp:
        for clip_seed, qtype in eval_clips(seed, per_type):
            example = data.make_example(clip_seed, qtype)
            path = data.write_clip(example.scene, Path(tmp) / f"clip-{clip_seed}.mp4")
            clip = answerer.read(path)
            others = {name: other.read(path) for name, other in variants.items()}
            qas = [qa for qa in data.questions(example.scene, random.Random(clip_seed)) if qa.qtype == qtype]
            for qa in qas:
                answers = {}
                for name in names:
                    ablation = ABLATIONS[name]
                    with ablated(model, ablation, qa.question):
                        answers[name] = answerer.answer(clip, qa.question if ablation.prompt_has_question else "")
                answers.update({name: variants[name].answer(others[name], qa.question) for name in variants})
                records.append(Record(clip_seed, qtype, qa.question, qa.answer, len(example.scene.shapes), answers))
            if progress is not None:
                progress(len(records))
    return records


def summarise(records: list[Record]) -> dict[str, dict[str, float]]:
    """ablation -> {question type: accuracy, "overall": over all questions, "mean_of_types": macro average}."""
    out: dict[str, dict[str, float]] = {}
    names = list(records[0].answers) if records else []
    for name in names:
        by_type: dict[str, list[bool]] = {}
        for r in records:
            by_type.setdefault(r.qtype, []).append(normalise(r.answers[name]) == r.expected)
        row = {t: sum(v) / len(v) for t, v in by_type.items()}
        row["mean_of_types"] = sum(row.values()) / len(row)
        row["overall"] = sum(sum(v) for v in by_type.values()) / sum(len(v) for v in by_type.values())
        out[name] = row
    return out


@dataclass
class JsonRecord:
    seed: int
    question: str
    expected: dict[str, str]
    answer: str  # the model's text, under ``data.JSON_SCHEMA``


def run_json_eval(answerer: StructuredAnswerer, *, seed: int = 1, per_type: int = 50, progress=None) -> list[JsonRecord]:
    """Every binding question of the evaluation's binding clips, asked "in JSON" under ``data.JSON_SCHEMA``
    (the same clips ``run_eval`` asks the plain questions about)."""
    records: list[JsonRecord] = []
    with tempfile.TemporaryDirectory() as tmp:
        for clip_seed, qtype in eval_clips(seed, per_type):
            if qtype != "binding":
                continue
            example = data.make_example(clip_seed, qtype)
            clip = answerer.read(data.write_clip(example.scene, Path(tmp) / f"clip-{clip_seed}.mp4"))
            for qa in data.json_questions(example.scene):
                text = answerer.answer(clip, qa.question, max_tokens=48, schema=data.JSON_SCHEMA)
                records.append(JsonRecord(clip_seed, qa.question, json.loads(qa.answer), text))
            if progress is not None:
                progress(len(records))
    return records


def json_summary(records: list[JsonRecord]) -> dict[str, float | int | str]:
    """How many answers parse as JSON, how many give both values right, and the line that says so
    (printed by ``eval-demo`` and the bench, written into ``TRAINING.md``)."""
    parsed = []
    for r in records:
        try:
            parsed.append(json.loads(r.answer))
        except json.JSONDecodeError:
            parsed.append(None)
    n = len(records)
    valid = sum(p is not None for p in parsed) / max(1, n)
    right = sum(p == r.expected for p, r in zip(parsed, records)) / max(1, n)
    line = (f"Binding questions asked \"in JSON\" under `data.JSON_SCHEMA` (n={n}): "
            f"{100 * valid:.1f} % parse, {100 * right:.1f} % give both values right.")
    return {"questions": n, "valid_json": valid, "right_values": right, "line": line}


TIME_QUESTIONS = {"appears": "What appears", "disappears": "What disappears", "direction": "Which way"}


def time_breakdown(records: list[Record], condition: str = "full") -> dict[str, dict[str, int]]:
    """Time questions by kind (what appears, what disappears, which way a shape moves): right / asked."""
    out = {kind: {"right": 0, "asked": 0} for kind in TIME_QUESTIONS}
    for r in records:
        kind = next((k for k, start in TIME_QUESTIONS.items() if r.question.startswith(start)), None)
        if r.qtype == "time" and kind is not None:
            out[kind]["asked"] += 1
            out[kind]["right"] += normalise(r.answers[condition]) == r.expected
    return out


def binding_chance(records: list[Record]) -> float:
    """Binding accuracy of a guess among the shapes in view (what a colour-mixing token allows)."""
    bind = [r for r in records if r.qtype == "binding"]
    return sum(1 / r.num_shapes for r in bind) / max(1, len(bind))


def markdown_table(summary: dict[str, dict[str, float]], records: list[Record]) -> str:
    types = list(data.QUESTION_TYPES)
    counts = {t: sum(r.qtype == t for r in records) for t in types}
    head = "| condition | " + " | ".join(f"{t} (n={counts[t]})" for t in types) + " | overall (all questions) | mean of types |"
    lines = [head, "|" + "---|" * (len(types) + 3)]
    for name, row in summary.items():
        cells = [f"{100 * row.get(t, float('nan')):.1f}" for t in types]
        label = f"{name}: {(ABLATIONS[name].description if name in ABLATIONS else VARIANT_LABELS.get(name, ''))}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {100 * row['overall']:.1f} | {100 * row['mean_of_types']:.1f} |")
    lines.append(
        f"| chance (guessing among the shapes in view for binding; uniform otherwise) | "
        f"{100 * binding_chance(records):.1f} | – | 33.3 | 50.0 | – | – |"
    )
    return "\n".join(lines)
