"""The demo model is never evaluated on a clip it was trained on.

Clips are fully determined by their seed, so "held out" means "disjoint seeds": the shipped
checkpoint's training and held-out seeds, and the seeds of every evaluation (the published one,
``bench/demo_eval.py``: seed 1, 100 clips per type; and any ``eval-demo --seed`` under 1000 with up
to 10,000 clips per type), must not meet.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from model.demo import SHIPPED_DIR, TRAINING_RECORD
from model.demo.evaluate import EVAL_SEED_BASE, eval_clips
from model.demo.train import HOLDOUT_SEED_OFFSET, TRAIN_SEED_BASE, TrainConfig, clip_seeds


def test_the_shipped_training_never_saw_an_evaluation_clip() -> None:
    config = json.loads((SHIPPED_DIR / TRAINING_RECORD).read_text())["config"]
    cfg = replace(TrainConfig(), seed=config["seed"], clips=config["clips"], holdout=config["holdout"])
    train, held = clip_seeds(cfg)
    assert len(train) == config["clips"] and len(held) == config["holdout"]
    assert not set(train) & set(held)
    published = {seed for seed, _ in eval_clips(1, 100)}
    assert len(published) == 100 * 4
    assert not published & (set(train) | set(held))


def test_every_allowed_training_run_stays_below_every_evaluation() -> None:
    highest_training = max(clip_seeds(replace(TrainConfig(), seed=999, clips=HOLDOUT_SEED_OFFSET,
                                              holdout=10_000))[1])
    lowest_evaluation = min(seed for seed, _ in eval_clips(0, 1))
    assert highest_training < lowest_evaluation == EVAL_SEED_BASE
    # evaluation seeds of different --seed values do not overlap either, up to 10,000 clips per type
    assert max(seed for seed, _ in eval_clips(0, 10_000)) < min(seed for seed, _ in eval_clips(1, 1))
    assert TRAIN_SEED_BASE > HOLDOUT_SEED_OFFSET  # a run's held-out seeds stay below the next run's


def test_too_many_clips_would_reach_the_held_out_seeds() -> None:
    with pytest.raises(ValueError, match="held-out"):
        clip_seeds(replace(TrainConfig(), clips=HOLDOUT_SEED_OFFSET + 1))
