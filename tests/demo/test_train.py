"""Demo training: the same prompt and visual tokens as serving, a loss that falls, bit-for-bit reruns."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

from model.config import QFormerDims
from model.conversation import Message
from model.demo import data
from model.demo.train import (
    DEMO_SPEC,
    PromptCache,
    TrainConfig,
    answer_loss,
    attach_features,
    batch_logits,
    build_demo_model,
    context_attention_parameters,
    patch_labels,
    render_clips,
    shape_patches,
    train,
    train_formats,
    train_llamavid,
    visual_tokens,
)
from model.llama_vid import VisualInput

# Smaller than the shipped model so each step takes milliseconds; the code path is the same.
SMOKE_SPEC = replace(DEMO_SPEC, hidden=64, intermediate=172, eva_width=88, eva_mlp=176, image_size=56,
                     qformer=QFormerDims(64, 2, 4, 128, 0, cross_attention_frequency=1), num_query=4)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    torch.manual_seed(0)
    model, _, _ = build_demo_model(tmp_path_factory.mktemp("smoke"), SMOKE_SPEC, seed=0)
    clips = render_clips(list(range(6)), SMOKE_SPEC.image_size, 14, workers=1, desc="smoke")
    attach_features(model, clips)
    return model, clips


def test_training_prompt_and_tokens_are_the_serving_ones(smoke):
    model, clips = smoke
    prompts = PromptCache(model)
    clip, question = clips[0], "What colour is the circle?"
    served = model.prepare([Message("user", question)], VisualInput(clip.features.float()))
    assert prompts(question) == served.input_ids
    with torch.no_grad():
        trained = visual_tokens(model, [clip.features], [question])[0]
        spliced = model.splice_embeddings(prompts(question), [trained])
    torch.testing.assert_close(trained, model.frame_tokens(clip.features.float(), question).tokens)
    torch.testing.assert_close(spliced, served.inputs_embeds)


def test_padded_batch_matches_single_examples(smoke):
    """Batching pads the Q-Former text and the LLM sequence; neither may change an example's logits."""
    model, clips = smoke
    prompts = PromptCache(model)
    qas = [data.QA("What colour is the circle?", "red", "binding"), data.QA("How many shapes are there?", "two", "counting")]
    with torch.no_grad():
        logits, labels = batch_logits(model, prompts, clips[:2], qas)
        for i in range(2):
            one, one_labels = batch_logits(model, prompts, clips[i : i + 1], qas[i : i + 1])
            n = one.shape[1]
            torch.testing.assert_close(logits[i, :n], one[0], atol=1e-4, rtol=1e-4)
            assert torch.equal(labels[i, :n], one_labels[0])


def test_loss_decreases(smoke):
    model, clips = smoke
    model.train()
    prompts = PromptCache(model)
    rng = random.Random(0)
    qas = [data.pick_question(rng, c.example.scene, c.example.qa.qtype) for c in clips]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(12):
        loss = answer_loss(*batch_logits(model, prompts, clips, qas))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < 0.5 * losses[0], losses


def test_stage_three_keeps_the_grounded_attention_and_the_qformer(tmp_path):
    model, _, _ = build_demo_model(tmp_path, SMOKE_SPEC, seed=1)
    clips = render_clips(list(range(6)), SMOKE_SPEC.image_size, 14, workers=1, desc="smoke")
    attach_features(model, clips)
    frozen = {id(p) for p in context_attention_parameters(model)} | {id(p) for p in model.qformer.parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cfg = TrainConfig(steps=3, batch_size=4, warmup=1, eval_every=3, spec=SMOKE_SPEC)
    train_llamavid(model, clips, clips[:2], cfg, progress=False)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    kept = {name for name, p in model.named_parameters() if id(p) in frozen}
    assert kept and not (changed & kept)
    assert {"visual.context_projector.weight", "visual.content_projector.0.weight"} <= changed
    assert any(name.startswith("llm.") for name in changed)


def test_stage_four_trains_json_answers_beside_the_plain_ones(smoke, monkeypatch):
    import model.demo.train as train_module

    model, clips = smoke
    frozen = {id(p) for p in context_attention_parameters(model)} | {id(p) for p in model.qformer.parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    asked: list[list[data.QA]] = []
    real = train_module.batch_logits
    monkeypatch.setattr(train_module, "batch_logits", lambda m, p, b, qas: asked.append(qas) or real(m, p, b, qas))
    cfg = TrainConfig(format_steps=4, batch_size=16, eval_every=4, spec=SMOKE_SPEC)
    report = train_formats(model, clips, clips[:4], cfg, progress=False)
    trained = [qa for qas in asked[:4] for qa in qas]  # the 4 steps; the held-out check comes after
    share = sum(qa.qtype == "json" for qa in trained) / len(trained)
    assert 0.3 < share < 0.7, share  # format_share=0.5 of 64 draws
    assert {qa.qtype for qa in trained} - {"json"}  # the rest replays stage 3's questions
    for qa in trained:
        if qa.qtype == "json":
            assert qa.question.endswith(data.JSON_INSTRUCTION) and json.loads(qa.answer)
    assert "json" in report["held_out"] and report["steps_done"] == 4
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    kept = {name for name, p in model.named_parameters() if id(p) in frozen}
    assert kept and not (changed & kept) and any(name.startswith("llm.") for name in changed)


def test_patch_labels_name_the_shape_under_each_patch():
    ex = data.make_example(5, "binding")
    labels = patch_labels(ex.scene, 84, 14)
    assert labels.shape == (ex.scene.num_frames, 36, 4)
    colours = {1 + list(data.COLOURS).index(s.colour) for s in ex.scene.shapes}
    kinds = {1 + data.KINDS.index(s.kind) for s in ex.scene.shapes}
    assert set(labels[0, :, 0].unique().tolist()) - {0} <= colours
    assert set(labels[0, :, 1].unique().tolist()) - {0} == kinds  # every shape covers some patch
    pairs = {(c, k) for c, k, _, _ in labels[0].tolist() if c}
    assert labels[0, :, 2].tolist() == [i // 6 for i in range(36)]  # row, then column, of each patch
    assert labels[0, :, 3].tolist() == [i % 6 for i in range(36)]
    assert pairs == {(1 + list(data.COLOURS).index(s.colour), 1 + data.KINDS.index(s.kind)) for s in ex.scene.shapes}


def test_grounding_mask_covers_only_the_shape_asked_about(smoke):
    _, clips = smoke
    clip = next(c for c in clips if len(c.example.scene.shapes) >= 2 and c.example.scene.kind in ("static", "moving"))
    scene, masks = clip.example.scene, {}
    for shape in scene.shapes:
        named = {data.shape_named(scene, q) for q in (f"What colour is the {shape.kind}?", f"Which shape is {shape.colour}?",
                                                  f"Which way does the {shape.kind} move?")}
        assert named == {shape}
        masks[shape.kind] = shape_patches(clip, shape)
        assert masks[shape.kind].any()
    first, *others = masks.values()
    for other in others:
        assert not (first & other).any()  # shapes never overlap, so neither do their patches


def test_a_short_run_is_bit_for_bit_reproducible_in_another_process():
    # 64 clips include the two whose H.264 bytes used to depend on the process (see encode_clip);
    # a second process with another hash seed must still produce the same weights at every stage.
    cfg = TrainConfig(steps=3, batch_size=4, vision_steps=2, vision_batch=8, qformer_steps=2, qformer_batch=4,
                      clips=64, holdout=4, eval_every=3, workers=1, spec=SMOKE_SPEC, warmup=1, format_steps=2)
    _, here = train(cfg, progress=False)
    script = (
        "import json, sys\n"
        "from model.demo.train import TrainConfig, train\n"
        "from tests.demo.test_train import SMOKE_SPEC\n"
        "from dataclasses import replace\n"
        f"cfg = replace(TrainConfig(), **{_plain_fields(cfg)!r}, spec=SMOKE_SPEC)\n"
        "print(json.dumps(train(cfg, progress=False)[1]['weights_sha256']))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).parents[2], timeout=300, check=True)
    there = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(here["weights_sha256"]) == {"stage1_vision", "stage2_qformer", "stage3_llamavid", "final"}
    assert here["weights_sha256"]["stage3_llamavid"] != here["weights_sha256"]["final"]  # stage 4 trained
    assert there == here["weights_sha256"]


def _plain_fields(cfg: TrainConfig) -> dict:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "spec"}
