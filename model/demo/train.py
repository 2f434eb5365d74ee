"""Train the demo LLaMA-VID on synthetic video QA, on two CPU cores, in about half an hour.

The whole architecture trains at tiny size: EVA tower, Q-Former with learned queries reading
the question, context attention, mean-pooled content token, both projectors and the LLaMA
decoder, with next-token loss on the answer only, in four stages: (1) the vision tower, (2) the
Q-Former's grounding, (3) LLaMA-VID proper, (4) binding questions answered in JSON (structured
output's demo), with stage 3's questions replayed beside them. The prompt comes from ``LlamaVid.prepare``
itself (cached per question), and the visual tokens are spliced by ``splice_embeddings``, so
training and serving build the same sequence. Data, initialisation and batch order are fixed by
the seed, and a rerun with the same thread count gives the same weights bit for bit: the record
keeps a SHA-256 of the weights after each stage (``weights_sha256``) so a rerun can be checked.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import multiprocessing as mp
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from ..config import QFormerDims
from ..conversation import Message
from ..eva import lavis_parameters, lavis_state_dict
from ..frame_tokens import HeadOutput
from ..llama_vid import LlamaVid, VisualInput
from ..preprocess import ClipPreprocessor
from ..tools.export import save_checkpoint
from ..tools.tiny import TinySpec, build_random_llamavid, train_sentencepiece, write_wordpiece_vocab
from ..video import VideoFile
from . import data

DEMO_SPEC = TinySpec(
    hidden=128, layers=2, heads=4, intermediate=344, vocab=512,
    eva_width=176, eva_depth=2, eva_mlp=768, image_size=84,
    qformer=QFormerDims(96, 2, 4, 384, 0, cross_attention_frequency=1), num_query=8, compress="mean", projector="mlp2x_gelu", max_token=512,
)
TRAIN_SEED_BASE = 1_000_000  # clip seeds for training: seed * TRAIN_SEED_BASE + i
HOLDOUT_SEED_OFFSET = 500_000  # held-out clips used for the progress bar, disjoint from training
# The recorded run's pixels were rescaled by float32(1/255) in float32, as this project did before
# transformers' processor (which rescales in float64, as transformers 4.31 did). The two differ by
# at most one float16 step on ~0.02% of the stored pixels, but only these reproduce the weights.
TRAINING_RESCALE = float(np.float32(1 / 255))


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000  # stage 3: visual head and LLM on frozen features (Q-Former frozen too, by default)
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    vision_steps: int = 1200  # stage 1: the vision tower on per-patch colour and shape labels
    vision_batch: int = 96  # frames
    vision_lr: float = 2e-3
    qformer_steps: int = 800  # stage 2: the Q-Former's text-conditioned context attention
    qformer_batch: int = 48  # clips, ``qformer_frames`` frames each
    qformer_frames: int = 6
    qformer_lr: float = 1e-3
    freeze_qformer: bool = True  # in stage 3, as LLaMA-VID's "qformer_pretrain_freeze" does
    freeze_context_attention: bool = True  # in stage 3: keep where the context token looks (stage 2's grounding)
    format_steps: int = 1000  # stage 4: binding questions answered in JSON, mixed with stage 3's questions
    format_lr: float = 1e-3
    format_share: float = 0.5  # of each stage-4 batch: JSON questions (the rest replays stage 3's mix)
    seed: int = 0
    clips: int = 6000
    holdout: int = 128
    eval_every: int = 100
    threads: int = 2
    workers: int = 2  # processes that render the clips before training
    spec: TinySpec = field(default_factory=lambda: DEMO_SPEC)
    max_minutes: float | None = None  # a safety stop; a run it cuts short is not reproducible


# -- data -------------------------------------------------------------------------------------
@dataclass
class Clip:
    pixels: torch.Tensor | None  # [T, 3, S, S] float16, preprocessed as the service does (but TRAINING_RESCALE)
    patch_labels: torch.Tensor  # [T, P, 4] int64: colour, kind (1-based, 0 = no shape), row, column
    example: data.Example
    features: torch.Tensor | None = None  # [T, 1 + P, C] float16 from the frozen vision tower


def render_clip(args: tuple[int, int, int]) -> Clip:
    """Seeded clip -> H.264 bytes -> decord -> CLIP preprocessing: the service's decode path."""
    seed, image_size, patch = args
    example = data.make_example(seed)
    video = VideoFile(data.encode_clip(data.render(example.scene)))
    frames = video.read(list(range(video.info.num_frames)))
    pixels = ClipPreprocessor(size=image_size, crop_size=image_size, rescale_factor=TRAINING_RESCALE)(frames)
    return Clip(pixels.half(), patch_labels(example.scene, image_size, patch), example)


def patch_labels(scene: data.Scene, image_size: int, patch: int, min_cover: float = 0.2) -> torch.Tensor:
    """Per patch: colour and kind (1-based, 0 = background) of the shape covering most of it, row, column."""
    maps = data.render_labels(scene)
    resized = np.stack([np.asarray(Image.fromarray(m).resize((image_size, image_size), Image.NEAREST)) for m in maps])
    g = image_size // patch
    tiles = torch.from_numpy(resized[:, : g * patch, : g * patch]).long()
    tiles = tiles.reshape(len(maps), g, patch, g, patch).permute(0, 1, 3, 2, 4).reshape(len(maps), g * g, -1)
    counts = F.one_hot(tiles, len(scene.shapes) + 1).sum(2)[..., 1:]  # [T, P, shapes]
    best, which = counts.max(-1)
    colour = torch.tensor([1 + list(data.COLOURS).index(s.colour) for s in scene.shapes])[which]
    kind = torch.tensor([1 + data.KINDS.index(s.kind) for s in scene.shapes])[which]
    covered = best >= min_cover * patch * patch
    row, col = torch.arange(g * g).div(g, rounding_mode="floor"), torch.arange(g * g) % g
    return torch.stack((colour * covered, kind * covered, *torch.broadcast_tensors(row, col, colour)[:2]), -1)


def clip_seeds(cfg: TrainConfig) -> tuple[list[int], list[int]]:
    """The clip seeds a run trains on and the held-out ones its progress bar scores."""
    if cfg.clips > HOLDOUT_SEED_OFFSET:
        raise ValueError(f"at most {HOLDOUT_SEED_OFFSET} training clips: more would reach the held-out seeds")
    base = (cfg.seed + 1) * TRAIN_SEED_BASE
    held = base + HOLDOUT_SEED_OFFSET
    return list(range(base, base + cfg.clips)), list(range(held, held + cfg.holdout))


def render_clips(seeds: list[int], image_size: int, patch: int, workers: int, desc: str) -> list[Clip]:
    jobs = [(s, image_size, patch) for s in seeds]
    if workers <= 1:
        return [render_clip(j) for j in tqdm(jobs, desc=desc, unit="clip", leave=False)]
    with mp.get_context("spawn").Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return list(tqdm(pool.imap(render_clip, jobs, chunksize=16), total=len(jobs), desc=desc, unit="clip", leave=False))


# -- model ------------------------------------------------------------------------------------
def tokenizer_corpus() -> list[str]:
    from ..conversation import TEMPLATES

    return [TEMPLATES["vicuna_v1"].system, "USER: ASSISTANT:"] * 20 + data.corpus() * 20


def build_demo_model(folder: Path, spec: TinySpec = DEMO_SPEC, *, seed: int = 0) -> tuple[LlamaVid, Path, Path]:
    """A randomly initialised model with tokenizers trained on the task's text (written to ``folder``)."""
    lines = tokenizer_corpus()
    sp_file = train_sentencepiece(lines, spec.vocab, folder / "tokenizer.model")
    qdir = folder / "qformer_tokenizer"
    qdir.mkdir(exist_ok=True)
    vocab_file = write_wordpiece_vocab(lines, qdir / "vocab.txt")
    model = build_random_llamavid(spec, sp_file, vocab_file, seed=seed)
    return model, sp_file, vocab_file


class PromptCache:
    """Prompt ids exactly as ``LlamaVid.prepare`` builds them at serving time, one call per question."""

    def __init__(self, model: LlamaVid) -> None:
        self.model = model
        self._ids: dict[str, list[int]] = {}

    def __call__(self, question: str) -> list[int]:
        if question not in self._ids:
            m = self.model
            dummy = torch.zeros(1, 1 + m.vision.num_patches, m.config.mm_hidden_size, dtype=m.dtype)
            self._ids[question] = m.prepare([Message("user", question)], VisualInput(dummy)).input_ids
        return self._ids[question]

    def target(self, answer: str) -> list[int]:
        tok = self.model.tokenizer
        return tok.encode(answer, add_bos=False) + [tok.eos_id]


def head_output(model: LlamaVid, features: list[torch.Tensor], questions: list[str], *,
                with_attention: bool = False) -> HeadOutput:
    """Differentiable ``frame_tokens`` for a batch of clips: every clip's frames read its own question."""
    counts = [len(f) for f in features]
    text = model.qformer_tokenizer(questions)
    index = torch.repeat_interleave(torch.arange(len(features)), torch.tensor(counts))
    feats = torch.cat(features).to(model.dtype)
    return model.visual(feats, model.qformer, text.input_ids[index], text.attention_mask[index],
                        with_attention=with_attention)


def visual_tokens(model: LlamaVid, features: list[torch.Tensor], questions: list[str]) -> list[torch.Tensor]:
    """EVA features per clip -> one [T * 2, H] tensor per clip, context token first per frame."""
    tokens = head_output(model, features, questions).tokens
    return [t.flatten(0, 1) for t in tokens.split([len(f) for f in features])]


def batch_logits(model: LlamaVid, prompts: PromptCache, clips: list[Clip], qas: list[data.QA]):
    """Teacher-forced logits [B, L, V] and labels [B, L] (-100 outside the answer)."""
    visual = visual_tokens(model, [c.features for c in clips], [qa.question for qa in qas])
    embeds, labels = [], []
    for tokens, qa in zip(visual, qas):
        prompt, target = prompts(qa.question), prompts.target(qa.answer)
        e = model.splice_embeddings(prompt + target, [tokens])[0]
        embeds.append(e)
        labels.append(torch.tensor([-100] * (len(e) - len(target)) + target))
    length = max(len(e) for e in embeds)
    mask = torch.zeros(len(embeds), length, dtype=torch.long)
    for i, e in enumerate(embeds):
        mask[i, : len(e)] = 1
    embeds_t = torch.stack([F.pad(e, (0, 0, 0, length - len(e))) for e in embeds])
    labels_t = torch.stack([F.pad(lab, (0, length - len(lab)), value=-100) for lab in labels])
    logits = model.llm(inputs_embeds=embeds_t, attention_mask=mask).logits
    return logits, labels_t


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def exact_match(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per example: every answer token and the EOS are the argmax, i.e. greedy decoding says the answer."""
    pred, gold = logits[:, :-1].argmax(-1), labels[:, 1:]
    return ((pred == gold) | (gold == -100)).all(-1)


def question_for(clip: Clip, rng: random.Random) -> data.QA:
    return data.pick_question(rng, clip.example.scene, clip.example.qa.qtype)


@torch.no_grad()
def holdout_accuracy(model: LlamaVid, prompts: PromptCache, checks: list[tuple[Clip, data.QA]],
                     batch_size: int = 64) -> dict[str, float]:
    """Teacher-forced exact match per question type on held-out (clip, question) pairs."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    for i in range(0, len(checks), batch_size):
        part = [c for c, _ in checks[i : i + batch_size]]
        qas = [qa for _, qa in checks[i : i + batch_size]]
        ok = exact_match(*batch_logits(model, prompts, part, qas))
        for qa, hit in zip(qas, ok.tolist()):
            hits.setdefault(qa.qtype, []).append(hit)
    model.train()
    out = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    out["all"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return out


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_step(opt: torch.optim.Optimizer, params: list[nn.Parameter], loss: torch.Tensor, lr: float) -> None:
    """One update, as every stage makes it: learning rate ``lr``, gradients clipped to norm 1."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


# -- stage 1: the vision tower ----------------------------------------------------------------
def pretrain_vision(model: LlamaVid, clips: list[Clip], held: list[Clip], cfg: TrainConfig, progress: bool) -> dict:
    """Train EVA (plus throw-away linear heads) to tell each patch's colour, shape and place; freeze it.

    This stands in for EVA-CLIP's pretraining: LLaMA-VID never trains its vision tower. Colour,
    kind, row and column are read out by *separate* linear heads, so the features carry them side
    by side (a mean over patches then mixes the colours of different shapes).
    """
    vision = model.vision.config
    width, grid = vision.hidden_size, vision.image_size // vision.patch_size
    sizes = (len(data.COLOURS) + 1, len(data.KINDS) + 1, grid, grid)
    heads = nn.ModuleList([nn.Linear(width, n) for n in sizes])
    frames = [(i, t) for i, c in enumerate(clips) for t in range(len(c.pixels))]
    rng = random.Random(cfg.seed + 1)
    model.vision.train()

    def loss_and_logits(pixels: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = model.vision(pixel_values=pixels.to(model.dtype)).last_hidden_state[:, 1:]
        logits = [h(feats) for h in heads]
        loss = sum(F.cross_entropy(lg.flatten(0, 1), labels[..., k].flatten()) for k, lg in enumerate(logits))
        return loss, logits

    # LAVIS' parameters, in LAVIS' order: the clipped global norm then rounds as it did when the
    # recorded checkpoint was trained with LAVIS' own module.
    with lavis_parameters(model.vision) as tower_params:
        params = tower_params + list(heads.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=0.0, betas=(0.9, 0.98))
        bar = tqdm(range(cfg.vision_steps), desc="stage 1: vision", unit="step", disable=not progress)
        for step in bar:
            picks = [frames[rng.randrange(len(frames))] for _ in range(cfg.vision_batch)]
            pixels = torch.stack([clips[i].pixels[t] for i, t in picks])
            labels = torch.stack([clips[i].patch_labels[t] for i, t in picks])
            loss, _ = loss_and_logits(pixels, labels)
            optimizer_step(opt, params, loss, lr_at(step, cfg.vision_steps, cfg.vision_lr, cfg.vision_steps // 10))
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
    model.vision.eval().requires_grad_(False)
    report = {"vision_steps": cfg.vision_steps}
    with torch.no_grad():  # accuracy on the patches a shape covers, held-out clips
        labels = torch.cat([c.patch_labels for c in held[:32]])
        _, logits = loss_and_logits(torch.cat([c.pixels for c in held[:32]]), labels)
        for k, name in enumerate(("colour", "kind", "row", "column")):
            on = labels[..., 1] > 0  # the patches a shape covers
            hit = logits[k].argmax(-1)[on] == labels[..., k][on]
            report[f"held_out_{name}_accuracy_on_shape_patches"] = round(hit.float().mean().item(), 4)
    return report


@torch.no_grad()
def attach_features(model: LlamaVid, clips: list[Clip], batch_frames: int = 256) -> None:
    """Run the frozen tower once over every clip (what the service caches) and drop the pixels."""
    pending: list[Clip] = []
    for clip in clips + [None]:
        if clip is not None:
            pending.append(clip)
        if pending and (clip is None or sum(len(c.pixels) for c in pending) >= batch_frames):
            pixels = torch.cat([c.pixels for c in pending]).to(model.dtype)
            feats = model.vision(pixel_values=pixels).last_hidden_state.half()
            for c, f in zip(pending, feats.split([len(c.pixels) for c in pending])):
                c.features, c.pixels = f.clone(), None
            pending = []


# -- stage 2: the Q-Former -------------------------------------------------------------------
def shape_patches(clip: Clip, shape: data.Shape) -> torch.Tensor:
    """[T, P] bool: the patches ``shape`` covers in each frame."""
    labels = clip.patch_labels
    colour, kind = 1 + list(data.COLOURS).index(shape.colour), 1 + data.KINDS.index(shape.kind)
    return (labels[..., 0] == colour) & (labels[..., 1] == kind)


def pretrain_qformer(model: LlamaVid, clips: list[Clip], cfg: TrainConfig, progress: bool) -> dict:
    """Text-conditioned grounding for the Q-Former, queries and context attention (a throw-away head).

    This stands in for the pretrained InstructBLIP Q-Former LLaMA-VID starts from: given "What
    colour is the circle?" or "Which shape is red?" about a frame with two or three shapes, the
    frame's *context token* alone must name the answer through a linear head that is dropped
    afterwards, and the context attention (queries over patches, averaged) is pulled onto the
    patches of the shape the question is about: a grounding signal, as region-text pretraining
    gives real Q-Formers, without which the attention finds the shape only now and then. The LLM
    is not involved.
    """
    answers = sorted(set(data.COLOURS) | set(data.KINDS))
    head = nn.Linear(model.config.hidden_size, len(answers))
    modules = (model.qformer, model.visual)
    params = [p for m in modules for p in m.parameters()] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.qformer_lr, weight_decay=0.0, betas=(0.9, 0.98))
    pool = [c for c in clips if any(qa.qtype == "binding" for qa in data.questions(c.example.scene))]
    if not pool:
        raise ValueError("stage 2 needs clips with two or more shapes in view; render more clips")
    rng = random.Random(cfg.seed + 2)
    for m in modules:
        m.train()
    bar = tqdm(range(cfg.qformer_steps), desc="stage 2: Q-Former", unit="step", disable=not progress)
    hits: list[float] = []
    for step in bar:
        feats, questions, targets, on_shape = [], [], [], []
        for clip in (pool[rng.randrange(len(pool))] for _ in range(cfg.qformer_batch)):
            qa = data.pick_question(rng, clip.example.scene, "binding")
            frames = rng.sample(range(len(clip.features)), min(cfg.qformer_frames, len(clip.features)))
            feats.append(clip.features[frames])
            questions.append(qa.question)
            targets += [answers.index(qa.answer)] * len(frames)
            on_shape.append(shape_patches(clip, data.shape_named(clip.example.scene, qa.question))[frames])
        out = head_output(model, feats, questions, with_attention=True)
        logits = head(out.tokens[:, 0])
        target = torch.tensor(targets)
        mask = torch.cat(on_shape)
        mass = (out.attention * mask).sum(-1)[mask.any(-1)].clamp_min(1e-6)
        loss = F.cross_entropy(logits, target) - mass.log().mean()
        optimizer_step(opt, params, loss, lr_at(step, cfg.qformer_steps, cfg.qformer_lr, cfg.qformer_steps // 10))
        hits.append((logits.argmax(-1) == target).float().mean().item())
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{sum(hits[-20:]) / len(hits[-20:]):.3f}")
    bar.close()
    return {"qformer_steps": cfg.qformer_steps, "last_20_step_accuracy": round(sum(hits[-20:]) / max(1, len(hits[-20:])), 4)}


# -- stage 3: LLaMA-VID on frozen features ---------------------------------------------------
def context_attention_parameters(model: LlamaVid) -> list[nn.Parameter]:
    """What decides where the context token looks: the queries, their projection, the patch keys, and
    the LayerNorm in front of the Q-Former. Trained in stage 2 and then kept: left free in stage 3,
    the answer loss pulls the attention off the asked-about shape (held-out attention mass on it
    fell from 0.98 to 0.74 within 100 steps) and binding stalled near 0.6 in two full runs."""
    v = model.visual
    return [v.query, *v.query_projector.parameters(), *v.key_projector.parameters(), *v.qformer_ln.parameters()]


def train_llamavid(model: LlamaVid, clips: list[Clip], held: list[Clip], cfg: TrainConfig, progress: bool,
                   started: float | None = None) -> dict:
    """The visual projectors and the LLM (and whatever ``cfg`` leaves unfrozen), next-token loss on the answer only."""
    rng = random.Random(cfg.seed)

    def draw() -> tuple[list[Clip], list[data.QA]]:
        batch = [clips[rng.randrange(len(clips))] for _ in range(cfg.batch_size)]
        return batch, [question_for(c, rng) for c in batch]

    checks = [(c, c.example.qa) for c in held]
    return fit_answers(model, draw, checks, cfg, steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup,
                       desc="stage 3: LLaMA-VID", progress=progress, started=started)


def train_formats(model: LlamaVid, clips: list[Clip], held: list[Clip], cfg: TrainConfig, progress: bool,
                  started: float | None = None) -> dict:
    """Stage 4: binding questions asked "in JSON" (``data.json_questions``), mixed with stage 3's questions.

    A short fine-tune of what stage 3 trains, so that the demo can show structured output with right
    values: a grammar only fixes the form, the model must still want the right colour and shape inside
    it. Half of every batch replays stage 3's question mix, so the one-word answers keep their accuracy.
    """
    rng = random.Random(cfg.seed + 4)
    pool = [(c, qs) for c in clips if (qs := data.json_questions(c.example.scene))]

    def draw() -> tuple[list[Clip], list[data.QA]]:
        batch, qas = [], []
        for _ in range(cfg.batch_size):
            if rng.random() < cfg.format_share:
                clip, json_qas = pool[rng.randrange(len(pool))]
                qa = rng.choice(json_qas)
            else:
                clip = clips[rng.randrange(len(clips))]
                qa = question_for(clip, rng)
            batch.append(clip)
            qas.append(qa)
        return batch, qas

    checks = [(c, c.example.qa) for c in held]
    checks += [(c, qas[0]) for c in held if (qas := data.json_questions(c.example.scene))]
    return fit_answers(model, draw, checks, cfg, steps=cfg.format_steps, lr=cfg.format_lr,
                       warmup=cfg.format_steps // 10, desc="stage 4: formats", progress=progress, started=started)


def fit_answers(model: LlamaVid, draw: Callable[[], tuple[list[Clip], list[data.QA]]],
                checks: list[tuple[Clip, data.QA]], cfg: TrainConfig, *, steps: int, lr: float, warmup: int,
                desc: str, progress: bool, started: float | None = None) -> dict:
    """Stages 3 and 4: batches from ``draw``, held-out exact match on ``checks`` every ``cfg.eval_every`` steps."""
    started = time.perf_counter() if started is None else started
    prompts = PromptCache(model)
    model.train()
    if cfg.freeze_qformer:
        model.qformer.eval().requires_grad_(False)
    if cfg.freeze_context_attention:
        for p in context_attention_parameters(model):
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98),
    )
    history, acc, loss_ema, steps_done = [], {}, None, 0
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    for step in bar:
        if cfg.max_minutes is not None and time.perf_counter() - started > cfg.max_minutes * 60:
            bar.write(f"stopping at step {step}: the --minutes budget is spent (this run is not reproducible)")
            break
        batch, qas = draw()
        loss = answer_loss(*batch_logits(model, prompts, batch, qas))
        optimizer_step(opt, params, loss, lr_at(step, steps, lr, warmup))
        steps_done = step + 1
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        if steps_done % cfg.eval_every == 0 or steps_done == steps:
            acc = holdout_accuracy(model, prompts, checks)
            history.append({"step": steps_done, "loss": round(loss_ema, 4), **{k: round(v, 4) for k, v in acc.items()}})
            if not progress:
                print(json.dumps(history[-1]), flush=True)
        bar.set_postfix(loss=f"{loss_ema:.3f}", held_out=f"{acc.get('all', 0):.2f}", bind=f"{acc.get('binding', 0):.2f}")
    bar.close()
    model.eval()
    return {
        "steps_done": steps_done,
        "final_loss": round(loss_ema or float("nan"), 4),
        "held_out": {k: round(v, 4) for k, v in acc.items()},
        "history": history,
    }


# -- the run ----------------------------------------------------------------------------------
def train(cfg: TrainConfig, out_dir: str | Path | None = None, *, progress: bool = True) -> tuple[LlamaVid, dict]:
    """Train from scratch; write the checkpoint to ``out_dir`` (official layout) when given."""
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)

    with tempfile.TemporaryDirectory() as tmp:
        model, sp_file, vocab_file = build_demo_model(Path(tmp), cfg.spec, seed=cfg.seed)
        size, patch = cfg.spec.image_size, model.vision.config.patch_size
        train_seeds, held_seeds = clip_seeds(cfg)
        train_clips = render_clips(train_seeds, size, patch, cfg.workers, "rendering clips")
        held = render_clips(held_seeds, size, patch, cfg.workers, "held-out clips")
        lap("render")
        digests = {}
        vision_report = pretrain_vision(model, train_clips, held, cfg, progress)
        attach_features(model, train_clips)
        attach_features(model, held)
        lap("stage1_vision")
        digests["stage1_vision"] = weights_digest(model)
        qformer_report = pretrain_qformer(model, train_clips, cfg, progress)
        lap("stage2_qformer")
        digests["stage2_qformer"] = weights_digest(model)
        stage3 = train_llamavid(model, train_clips, held, cfg, progress, started)
        lap("stage3_llamavid")
        digests["stage3_llamavid"] = weights_digest(model)
        stage4 = train_formats(model, train_clips, held, cfg, progress, started)
        lap("stage4_formats")
        model.eval()
        digests["final"] = weights_digest(model)
        summary = {
            "config": config_dict(cfg),
            "seconds": timings,
            "vision": vision_report,
            "qformer": qformer_report,
            **stage3,
            "formats": stage4,
            "weights_sha256": digests,
        }
        if out_dir is not None:
            save_checkpoint(model, out_dir, fmt="safetensors", num_shards=1, tokenizer_model=sp_file, qformer_vocab=vocab_file)
    return model, summary


def weights_digest(model: LlamaVid) -> str:
    """SHA-256 over every tensor of the state dict: two runs agree bit for bit iff their digests do.

    The vision tower is hashed under its LAVIS names (``vision.`` + ``eva_vit_g.pth``'s keys, in that
    order, first), as the state dict named it when the tower was LAVIS' own module: the digests
    recorded with that module still check a rerun.
    """
    h = hashlib.sha256()
    vision = (("vision." + name, tensor) for name, tensor in lavis_state_dict(model.vision).items())
    rest = ((name, tensor) for name, tensor in model.state_dict().items() if not name.startswith("vision."))
    for name, tensor in itertools.chain(vision, rest):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def config_dict(cfg: TrainConfig) -> dict:
    out = asdict(replace(cfg))
    out["spec"]["qformer"] = asdict(cfg.spec.qformer)
    return json.loads(json.dumps(out))
